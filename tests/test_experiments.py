"""Fast versions of the experiment scripts: the data generators are right and a model learns from them."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from nestlearn.data.synthetic import accuracy, mqar, parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import continual_table  # noqa: E402
import synthetic  # noqa: E402


def test_mqar_targets_are_the_values_of_the_queried_keys():
    tokens, targets, mask = mqar(4, 5, generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (4, 20) and mask.sum() == 4 * 5
    for b in range(4):
        pairs = dict(zip(tokens[b, 0:10:2].tolist(), tokens[b, 1:10:2].tolist(), strict=True))
        for i in mask[b].nonzero().flatten().tolist():
            assert targets[b, i] == pairs[tokens[b, i].item()] == tokens[b, i + 1 if i + 1 < 20 else i]


def test_mqar_gap_holds_the_pairs_across_filler_that_is_never_a_key():
    tokens, targets, mask = mqar(4, 5, generator=torch.Generator().manual_seed(0), gap=30)
    assert tokens.shape == (4, 50) and mask.sum() == 4 * 5
    filler = tokens[:, 10:40]
    assert (filler >= 128).all()  # the value range: no filler token reads as a query
    assert not mask[:, :40].any()  # only the queries after the gap are scored
    for b in range(4):
        pairs = dict(zip(tokens[b, 0:10:2].tolist(), tokens[b, 1:10:2].tolist(), strict=True))
        for i in mask[b].nonzero().flatten().tolist():
            assert targets[b, i] == pairs[tokens[b, i].item()]
    with pytest.raises(ValueError, match="gap=-1 must be an int >= 0"):
        mqar(1, 5, gap=-1)


def test_long_stream_reports_loss_by_position_and_the_dead_memories(tmp_path, capsys):
    import long_stream

    out = tmp_path / "r.json"
    rows = long_stream.main(
        [
            "fresh:titans:zero",
            "fresh:titans",
            "--data",
            "random",
            "--length",
            "2048",
            "--streams",
            "1",
            "--out",
            str(out),
        ]
    )
    table = capsys.readouterr().out
    assert "| fresh:titans:zero |" in table and "blocks.0.mixer.memory (4/4)" in table
    assert list(rows[0]["bits_per_token"]) == ["0-64", "64-128", "128-256", "256-512", "512-1024", "1024-2048"]
    assert rows[1]["health"][-1]["memories"][0]["dead"] == 0 and len(rows[1]["health"]) == 4
    assert json.loads(out.read_text())["rows"][0]["model"] == "titans-debug"


def test_parity_targets_are_running_parities():
    tokens, targets, mask = parity(3, 9, generator=torch.Generator().manual_seed(0))
    bits = tokens - 1
    for b in range(3):
        for i in range(9):
            assert targets[b, i] - 1 == bits[b, : i + 1].sum() % 2
    assert mask.all()


def test_oracle_scores_one_and_constant_guess_scores_chance():
    tokens, targets, mask = parity(512, 16, generator=torch.Generator().manual_seed(0))
    oracle = torch.nn.functional.one_hot(targets, 4).float()
    assert accuracy(oracle, targets, mask) == 1.0
    constant = torch.nn.functional.one_hot(torch.ones_like(targets), 4).float()
    assert abs(accuracy(constant, targets, mask) - 0.5) < 0.05


def test_synthetic_experiment_trains_transformer_and_hope():
    rows = synthetic.main(
        [
            "--task",
            "mqar",
            "--presets",
            "transformer",
            "hope",
            "--steps",
            "25",
            "--batch",
            "8",
            "--pairs",
            "4",
            "--quiet",
        ]
    )
    for row in rows:
        assert row["final_loss"] < row["first_loss"], row  # learning happens in both
        assert 0.0 <= row["accuracy"] <= 1.0


def test_synthetic_experiment_takes_memory_and_cms_flags_and_refuses_a_bad_lr_init(capsys):
    rows = synthetic.main(
        [
            "--task",
            "parity",
            "--presets",
            "titans",
            "--rule",
            "dgd",
            "--max-lr",
            "2",
            "--lr-init",
            "0.05",
            "--steps",
            "25",
            "--batch",
            "8",
            "--length",
            "8",
            "--quiet",
        ]
    )
    assert rows[0]["final_loss"] < rows[0]["first_loss"] and 0.0 <= rows[0]["accuracy_longer"] <= 1.0
    rows = synthetic.main(
        [
            "--task",
            "mqar",
            "--presets",
            "hope",
            "--update-periods",
            "none",
            "--steps",
            "2",
            "--batch",
            "4",
            "--pairs",
            "2",
            "--quiet",
        ]
    )
    assert (
        rows[0]["params"]
        < synthetic.main(
            ["--task", "mqar", "--presets", "hope", "--steps", "1", "--batch", "2", "--pairs", "2", "--quiet"]
        )[0]["params"]
    )
    with pytest.raises(SystemExit):
        synthetic.main(["--max-lr", "2", "--lr-init", "2"])
    assert "--lr-init must lie strictly between 0 and the cap η_max = 2.0; got 2.0" in capsys.readouterr().err


def test_synthetic_experiment_read_flag_reaches_the_memories():
    # --read snapshot (eq. 90) and dual train different models from the same seed: the flag is not a no-op
    args = ["--task", "mqar", "--presets", "titans", "--steps", "3", "--batch", "4", "--pairs", "6", "--quiet"]
    dual, snapshot = (synthetic.main([*args, "--read", read])[0] for read in ("dual", "snapshot"))
    assert dual["first_loss"] != snapshot["first_loss"]


def test_continual_table_reads_run_folders_and_refuses_empty_ones(tmp_path, capsys):
    from nestlearn.evals.continual import ContinualConfig

    for seed in (0, 1):
        run = tmp_path / f"run-s{seed}"
        run.mkdir()
        config = dataclasses.asdict(ContinualConfig(seed=seed))
        metrics = {"average": 3.0 + seed, "bwt": 0.1, "forgetting": 0.0, "fwt": 1.0}
        (run / "results.json").write_text(json.dumps({"config": config, "metrics": metrics, "seconds": 30.0}))
        (tmp_path / f"run-s{seed}.log").write_text("")
    assert continual_table.main(sorted(str(p) for p in tmp_path.glob("run-*"))) == 0
    out, err = capsys.readouterr()
    assert "| languages | transformer | finetune | 0, 1 | 3.500 ± 0.707 |" in out and "not folders" in err
    (tmp_path / "empty").mkdir()
    assert continual_table.main([str(tmp_path / "empty")]) == 1
    assert "no results.json in" in capsys.readouterr().err


def test_pretrained_study_plans_its_runs_and_reports_their_folders(tmp_path, capsys):
    import pretrained_study

    assert pretrained_study.main(["plan", "--init", "MODEL", "--root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == len(pretrained_study.RUNS) and all("--init MODEL --stream facts" in line for line in plan)
    for name, average, bpb in (("facts-lora-s0", 0.5, 1.10), ("facts-base-s0", 0.0, 1.05)):
        (tmp_path / name).mkdir()
        general = {
            "before": {"wiki_bits_per_byte": 1.05, "squad_f1": 0.3},
            "after": {"wiki_bits_per_byte": bpb, "squad_f1": 0.2},
        }
        result = {
            "config": {"strategy": name.split("-")[1], "few_shot": 0},
            "metrics": {"average": average, "forgetting": 0.1, "bwt": -0.1},
            "baseline": [0.0, 0.0],
            "general": general,
            "trainable_params": 1000,
            "train_tokens_per_s": 50.0,
            "seconds": 600.0,
        }
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    assert pretrained_study.main(["report", "--root", str(tmp_path), "--picture", str(tmp_path / "p.png")]) == 0
    out = capsys.readouterr().out
    assert "| facts-lora-s0 | lora | 0.500 | +0.500 | +0.100 | -0.100 | +0.050 | -0.100 | 1,000 | 50 | 10 |" in out
    assert (tmp_path / "p.png").is_file()
    with pytest.raises(SystemExit, match="no \\*/results.json"):
        pretrained_study.report(tmp_path / "empty", None)
