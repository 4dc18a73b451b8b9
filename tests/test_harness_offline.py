"""`nestlearn lm-eval` without the HF hub: a task whose data is on the hub fails with one line that says how to give
the data locally (simulated by the errors an offline machine gets, and for real with the hub's offline switches),
the example task of the README and the help runs from local files, and --help says how to name a checkpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'lm-eval==0.4.13' (or -e '.[eval]')")
datasets = pytest.importorskip("datasets")

from nestlearn.evals import harness  # noqa: E402
from nestlearn.evals.harness import NestlearnLM, offline_message  # noqa: E402
from tests.test_harness import ROOT, checkpoint, expected_accuracy  # noqa: E402

EXAMPLE_TASK = "docs/lm-eval/spelling.yaml"
HELLASWAG = "Rowan/hellaswag"  # the dataset_path of lm-eval's hellaswag task


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("ckpt"), "transformer")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv for lm-eval's parser


def raised(make):
    """The exception `make()` builds, raised and caught, so that it carries its chain and a traceback."""
    try:
        make()
    except BaseException as e:  # noqa: BLE001
        return e
    raise AssertionError("make() raised nothing")


def from_(outer: BaseException, inner: BaseException):
    def make():
        try:
            raise inner
        except BaseException as e:
            raise outer from e

    return make


def hub_errors() -> dict:
    """The errors an offline machine gets from loading a dataset of the hub, by the library that raises them."""
    import huggingface_hub.errors as hub
    import requests
    import urllib3.exceptions as u3

    reach = f"Couldn't reach '{HELLASWAG}' on the Hub"
    dns = socket.gaierror(-2, "Name or service not known")
    other = RuntimeError("not a network error")  # each library's error alone must be recognised, not its cause
    errors = {  # datasets 5.2 with HF_HUB_OFFLINE=1, then without it and without a network
        "datasets-offline-mode": from_(ConnectionError(f"{reach} (OfflineModeIsEnabled)"), hub.OfflineModeIsEnabled()),
        "datasets-no-network": from_(
            ConnectionError(f"{reach} (LocalEntryNotFoundError)"), hub.LocalEntryNotFoundError("not in the cache")
        ),
        "hub-offline-mode": from_(hub.OfflineModeIsEnabled("offline mode is enabled"), other),
        "hub-not-cached": from_(hub.LocalEntryNotFoundError("not in the cache, and the hub cannot be reached"), other),
        "requests": from_(requests.exceptions.ConnectionError("Max retries exceeded"), other),
        "urllib3": from_(u3.MaxRetryError(None, "/datasets", reason=u3.NameResolutionError("h", None, dns)), other),
        "socket": from_(OSError("lookup failed"), dns),
    }
    for name in ("httpx", "httpx2"):  # huggingface_hub's HTTP client, by either name
        try:
            module = __import__(name)
        except ImportError:
            continue
        errors[name] = from_(module.ConnectError("[Errno -2] Name or service not known"), other)
    try:
        import aiohttp  # fsspec's HTTP client, for data files given by URL
    except ImportError:
        pass
    else:
        errors["aiohttp"] = from_(aiohttp.ClientConnectionError("cannot connect"), other)
    return errors


@pytest.mark.parametrize("name", list(hub_errors()))
def test_offline_message_knows_what_an_offline_machine_raises(name):
    message = offline_message(raised(hub_errors()[name]))
    assert message is not None and message.startswith("a task needs data from the HF hub, which cannot be reached")
    assert "\n" not in message and "--include_path" in message and EXAMPLE_TASK in message


@pytest.mark.parametrize(
    "error",
    [ValueError("doc_to_target must be set"), FileNotFoundError("no such file: docs.jsonl"), KeyError("test")],
)
def test_other_errors_are_not_called_offline(error):
    assert offline_message(raised(from_(error, RuntimeError("inner")))) is None


def test_a_hub_task_offline_is_one_line_naming_the_task_and_the_dataset(ckpt, offline, monkeypatch, capsys):
    # lm-eval's task.download calls datasets.load_dataset: make it fail as it does on a machine without a network
    seen = []

    def load_dataset(path, *args, **kwargs):
        seen.append(path)
        raise_it = hub_errors()["datasets-no-network"]
        raise_it()

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    argv = ["--model", "nestlearn", "--model_args", f"path={ckpt}", "--device", "cpu", "--tasks", "hellaswag"]
    assert harness.main(argv) == 1
    assert seen == [HELLASWAG]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("nestlearn lm-eval: error:")]
    assert line.startswith(
        f"nestlearn lm-eval: error: task 'hellaswag' needs the dataset '{HELLASWAG}' from the HF hub, which cannot "
        f"be reached from here (ConnectionError: Couldn't reach '{HELLASWAG}' on the Hub (LocalEntryNotFoundError))."
    )
    assert EXAMPLE_TASK in line and "--include_path" in line and line.endswith("(NESTLEARN_DEBUG=1 for a traceback)")
    # NESTLEARN_DEBUG=1: lm-eval's own error, with its traceback
    monkeypatch.setenv("NESTLEARN_DEBUG", "1")
    with pytest.raises(ConnectionError, match="Couldn't reach"):
        harness.main(argv)


def test_a_hub_task_offline_for_real(ckpt, tmp_path):
    # no simulation: the hub's offline switches make datasets raise what it raises without a network
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("NESTLEARN_DEBUG", None)
    args = ["--model", "nestlearn", "--model_args", f"path={ckpt}", "--device", "cpu", "--tasks", "hellaswag"]
    run = subprocess.run(
        [sys.executable, "-m", "nestlearn.cli", "lm-eval", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.splitlines()[-1].startswith(
        f"nestlearn lm-eval: error: task 'hellaswag' needs the dataset '{HELLASWAG}' from the HF hub"
    ), run.stderr[-3000:]


def test_the_example_task_runs_from_local_files(ckpt, offline, monkeypatch):
    monkeypatch.chdir(ROOT)  # its data_files path is relative to the repository root, where the README runs
    docs = [json.loads(line) for line in (ROOT / "docs/lm-eval/spelling.jsonl").read_text().splitlines()]
    assert len(docs) == 40 and all(
        len(d["choices"]) == 2 and sorted(d["choices"][0]) == sorted(d["choices"][1]) for d in docs
    )
    lm = NestlearnLM(path=str(ckpt), device="cpu", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=[EXAMPLE_TASK])
    assert out["results"]["nestlearn_spelling"]["acc,none"] == pytest.approx(expected_accuracy(lm, docs))


def test_the_readme_and_the_help_name_only_local_tasks():
    # the lm-eval commands the README and --help show run offline: their --tasks is a file of the repository
    # (but for the help's example of a task of one's own, my_task in my_tasks/)
    commands = [
        line
        for text in ((ROOT / "README.md").read_text(), harness.HELP)
        for line in text.replace("\\\n", " ").splitlines()  # a command may go on after a backslash
        if line.strip().startswith("nestlearn lm-eval ") and "--include_path my_tasks/" not in line
    ]
    assert len(commands) == 2, commands  # the README's and the help's first example
    for line in commands:
        words = shlex.split(line.split("#")[0])
        tasks = words[words.index("--tasks") + 1]
        assert (ROOT / tasks).is_file(), line


def test_help_says_how_to_name_a_checkpoint(monkeypatch, capsys):
    from nestlearn import cli

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["lm-eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: nestlearn lm-eval --model nestlearn --model_args path=CHECKPOINT")
    assert re.search(r"--model nestlearn --model_args path=runs/hope-tiny --tasks \S+", out)
    assert "usage: lm-eval" in out  # then lm-eval's own help
