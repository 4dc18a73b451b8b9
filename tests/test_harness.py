"""lm-eval-harness support (nestlearn.evals.harness), offline: every score equals one computed here from a direct
forward pass, streaming past max_length equals one forward over the whole input, truncation matches lm-eval's own
rolling windows, generation stops at stop strings, and simple_evaluate and `nestlearn lm-eval` score a local
multiple-choice task exactly as the model does."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'lm-eval==0.4.13' (or -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from nestlearn import build, presets  # noqa: E402
from nestlearn.data.tokenizer import ByteTokenizer  # noqa: E402
from nestlearn.evals.harness import NestlearnLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EOS = ByteTokenizer().eos_id
TEXTS = ["the river memory learns fast", "and slow levels update at their own rate", "while a cat sat on the mat"]
DOCS = [  # a local multiple-choice task: the query, three choices, the index of the right one
    {"query": "The cat sat on the", "choices": ["mat", "river", "levels"], "gold": 0},
    {"query": "Memory learns", "choices": ["fast", "mat", "the"], "gold": 0},
    {"query": "Levels update at their own", "choices": ["cat", "rate", "sat"], "gold": 1},
    {"query": "A river", "choices": ["slow", "while", "memory"], "gold": 2},
    {"query": "While a cat", "choices": ["sat", "and", "own"], "gold": 0},
    {"query": "Fast and", "choices": ["learns", "slow", "update"], "gold": 1},
]


def checkpoint(root: Path, preset: str) -> Path:
    """A random model of the debug size, saved as a checkpoint folder with its byte tokenizer (257 ids). Untied
    embeddings: a random model with tied ones predicts its input byte, so greedy text would repeat one byte."""
    torch.manual_seed(0)
    config = getattr(presets, preset)("debug")
    model = build(dataclasses.replace(config, vocab_size=ByteTokenizer().vocab_size, tie_embeddings=False))
    path = root / preset
    model.save_pretrained(path)
    ByteTokenizer().save(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {p: checkpoint(root, p) for p in ("transformer", "titans", "hope")}


def ll_direct(lm: NestlearnLM, context: str, continuation: str) -> tuple[float, bool]:
    """Σ log p(continuation | eos + context) and greedy-ness from one forward pass over the whole input."""
    ctx, cont = [EOS, *context.encode()], list(continuation.encode())
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(full[:, :-1])[0].float(), -1)[0, len(ctx) - 1 :]
    target = torch.tensor(cont)
    return logp.gather(-1, target[:, None]).double().sum().item(), bool((logp.argmax(-1) == target).all())


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.mark.parametrize("preset", ["transformer", "hope"])
def test_loglikelihood_is_the_forward_pass(ckpts, preset):
    lm = NestlearnLM(path=str(ckpts[preset]), device="cpu", batch_size=3)
    pairs = [(t, " " + u) for t in TEXTS for u in ("mat", "levels update", "x")] + [("", "the river")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (lp, greedy) in zip(pairs, got, strict=True):
        want_lp, want_greedy = ll_direct(lm, context, continuation)
        assert lp == pytest.approx(want_lp, abs=1e-5)
        assert greedy == want_greedy
    # is_greedy true: a one-byte continuation that is the model's argmax, among contexts whose argmax is a printable
    # ASCII byte (so that the text round-trips through the tokenizer); false for any other byte
    contexts = [f"{TEXTS[0]} {i:02d}" for i in range(64)]
    with torch.no_grad():
        nxt = lm.model(torch.tensor([[EOS, *c.encode()] for c in contexts]))[0][:, -1].argmax(-1).tolist()
    found = [(c, n) for c, n in zip(contexts, nxt, strict=True) if 32 <= n < 127][:2]
    assert found, "no context whose greedy next byte is printable ASCII"
    cases = [(c, chr(n)) for c, n in found] + [(c, chr(n + 1 if n < 126 else n - 1)) for c, n in found]
    got = lm.loglikelihood(requests("loglikelihood", cases), disable_tqdm=True)
    assert [g for _, g in got] == [True] * len(found) + [False] * len(found)


@pytest.mark.parametrize("preset", ["transformer", "hope"])
def test_rolling_is_the_model_loss(ckpts, preset):
    lm = NestlearnLM(path=str(ckpts[preset]), device="cpu", batch_size=2)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in TEXTS]), disable_tqdm=True)
    for text, lp in zip(TEXTS, got, strict=True):
        tokens = torch.tensor([[EOS, *text.encode()]])
        with torch.no_grad():
            loss, _ = lm.model.loss(tokens)
        assert lp == pytest.approx(-loss.item() * len(text.encode()), abs=1e-4)


@pytest.mark.parametrize("preset", ["titans", "hope"])
def test_streaming_past_max_length_is_one_forward(ckpts, preset):
    # memories are streamed (auto): 16-token windows with the state carried == one pass over all ~100 tokens
    lm = NestlearnLM(path=str(ckpts[preset]), device="cpu", max_length=16, batch_size=2)
    assert lm.stream
    context, continuation = " ".join(TEXTS), " and the cat learns"
    (lp, greedy), (short, _) = lm.loglikelihood(requests("loglikelihood", [(context, continuation), ("a", " b")]))
    want_lp, want_greedy = ll_direct(lm, context, continuation)
    assert lp == pytest.approx(want_lp, abs=1e-5) and greedy == want_greedy
    assert short == pytest.approx(ll_direct(lm, "a", " b")[0], abs=1e-5)  # a short row padded in the same batch
    (rolled,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(context,)]))
    with torch.no_grad():
        loss, _ = lm.model.loss(torch.tensor([[EOS, *context.encode()]]))
    assert rolled == pytest.approx(-loss.item() * len(context), abs=1e-4)
    # forced truncation reads only the last 16 tokens, which must change the score
    cut = NestlearnLM(path=str(ckpts[preset]), device="cpu", max_length=16, long_inputs="truncate")
    (lp_cut, _), *_ = cut.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    assert abs(lp_cut - want_lp) > 1e-3


def test_truncation_is_lm_evals_windows(ckpts):
    # full attention is truncated (auto): the last max_length tokens for loglikelihood, and for rolling exactly
    # the windows lm-eval's HF models use (get_rolling_token_windows + make_disjoint_window)
    L = 16
    lm = NestlearnLM(path=str(ckpts["transformer"]), device="cpu", max_length=L, batch_size=4)
    assert not lm.stream
    context, continuation = " ".join(TEXTS), " and the cat"
    ctx, cont = [EOS, *context.encode()], list(continuation.encode())
    inp = (ctx + cont)[-(L + 1) :]
    with torch.no_grad():
        logp = F.log_softmax(lm.model(torch.tensor([inp[:-1]]))[0], -1)[0, -len(cont) :]
    want = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
    ((lp, _),) = lm.loglikelihood(requests("loglikelihood", [(context, continuation)]))
    assert lp == pytest.approx(want, abs=1e-5)
    assert abs(lp - ll_direct(lm, context, continuation)[0]) > 1e-3  # the whole context would score differently
    doc = list(context.encode())
    want = 0.0
    for a, b in map(make_disjoint_window, get_rolling_token_windows(doc, EOS, L, 1)):
        x = (a + b)[-(L + 1) :][:-1]
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([x]))[0], -1)[0, -len(b) :]
        want += logp.gather(-1, torch.tensor(b)[:, None]).sum().item()
    (rolled,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(context,)]))
    assert rolled == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("preset", ["transformer", "titans", "hope"])
def test_generate_until_is_greedy_and_stops(ckpts, preset):
    lm = NestlearnLM(path=str(ckpts[preset]), device="cpu")

    def stops(text: str) -> list[str]:  # characters whose first occurrence is well inside the text
        return [c for i, c in enumerate(text) if i >= 3 and c != "\ufffd" and text.index(c) == i]

    # a random model may loop on two bytes for some prompt: take the first prompt whose greedy text has a stop
    for prompt in ("The river", "A cat sat", "Memory learns"):
        with torch.no_grad():
            ids = lm.model.generate(torch.tensor([[EOS, *prompt.encode()]]), 12)[0, -12:].tolist()
        text = ByteTokenizer().decode(ids)
        if stops(text):
            break
    assert EOS not in ids  # else the expected text below would stop early
    (full,) = lm.generate_until(requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]))
    assert full == text
    # a stop character whose first occurrence is well inside the text: the answer ends just before it
    stop = stops(text)[0]
    gen = {"until": ["never appears", stop], "max_gen_toks": 12, "do_sample": False, "temperature": 0.7}
    (cut,) = lm.generate_until(requests("generate_until", [(prompt, gen)]))
    assert cut == text[: text.index(stop)]
    (short,) = lm.generate_until(requests("generate_until", [(prompt, {"until": "never", "max_gen_toks": 3})]))
    assert short == ByteTokenizer().decode(ids[:3])


def test_auto_streams_memories_and_truncates_full_attention(tmp_path):
    for preset, stream in (("hope", True), ("titans", True), ("hope_attention", False), ("transformer", False)):
        assert NestlearnLM(path=str(checkpoint(tmp_path, preset)), device="cpu").stream == stream, preset
    windowed = build(dataclasses.replace(presets.transformer("debug"), vocab_size=257))
    windowed.config.attention.window = 8
    windowed.save_pretrained(tmp_path / "windowed")
    ByteTokenizer().save(tmp_path / "windowed")
    assert NestlearnLM(path=str(tmp_path / "windowed"), device="cpu").stream
    assert not NestlearnLM(path=str(tmp_path / "windowed"), device="cpu", long_inputs="truncate").stream


def test_errors_name_the_value_and_the_fix(ckpts, tmp_path):
    with pytest.raises(ValueError, match="path="):
        NestlearnLM()
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\].*path="):
        NestlearnLM(pretrained=str(ckpts["titans"]))
    with pytest.raises(ValueError, match="batch_size='auto'.*--batch_size 16"):
        NestlearnLM(path=str(ckpts["titans"]), batch_size="auto")
    with pytest.raises(ValueError, match="long_inputs='window'"):
        NestlearnLM(path=str(ckpts["titans"]), long_inputs="window")
    with pytest.raises(ValueError, match="max_length=0"):
        NestlearnLM(path=str(ckpts["titans"]), max_length=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        NestlearnLM(path=str(tmp_path))


def write_task(root: Path) -> Path:
    """A multiple-choice task on a local JSONL file, in the YAML format of `--include_path`."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "task.yaml").write_text(
        "task: nestlearn_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {root / 'hf-cache'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{query}}'\ndoc_to_choice: choices\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def expected_accuracy(lm: NestlearnLM, docs: list[dict]) -> float:
    right = 0
    for d in docs:
        scores = [ll_direct(lm, d["query"], " " + c)[0] for c in d["choices"]]
        right += max(range(len(scores)), key=scores.__getitem__) == d["gold"]
    return right / len(docs)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_simple_evaluate_on_a_local_task(ckpts, tmp_path, offline):
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(write_task(tmp_path / "tasks")), include_defaults=False)
    lm = NestlearnLM(path=str(ckpts["transformer"]), device="cpu", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["nestlearn_local_mc"], task_manager=tasks)
    acc = out["results"]["nestlearn_local_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert acc == pytest.approx(expected_accuracy(lm, DOCS))
    # by name, as the command line does it (importing nestlearn.evals.harness registered "nestlearn")
    out = lm_eval.simple_evaluate(
        model="nestlearn",
        model_args=f"path={ckpts['transformer']},device=cpu",
        tasks=["nestlearn_local_mc"],
        limit=2,
        task_manager=tasks,
    )
    assert out["results"]["nestlearn_local_mc"]["acc,none"] == pytest.approx(expected_accuracy(lm, DOCS[:2]))


@pytest.mark.parametrize("command", [["nestlearn.cli", "lm-eval"], ["nestlearn.evals.harness"]], ids=["cli", "module"])
def test_command_line(ckpts, tmp_path, command):
    tasks = write_task(tmp_path / "tasks")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    args = [
        "--model",
        "nestlearn",
        "--model_args",
        f"path={ckpts['transformer']}",
        "--device",
        "cpu",
        "--tasks",
        "nestlearn_local_mc",
        "--include_path",
        str(tasks),
        "--limit",
        "4",
        "--batch_size",
        "4",
        "--output_path",
        str(tmp_path / "out"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", *command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (result,) = (tmp_path / "out").rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["nestlearn_local_mc"]["acc,none"]
    lm = NestlearnLM(path=str(ckpts["transformer"]), device="cpu")
    assert acc == pytest.approx(expected_accuracy(lm, DOCS[:4]))
