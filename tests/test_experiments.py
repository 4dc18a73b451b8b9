"""Fast versions of the experiment scripts: the data generators are right and a model learns from them."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nestlearn.data.synthetic import accuracy, mqar, parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import continual_table  # noqa: E402
import pretrained_study  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture(autouse=True)
def _no_study_record(monkeypatch, tmp_path):
    """The study's tests see the runs they make, not the ones the repository has recorded."""
    monkeypatch.setattr(pretrained_study, "RECORD", tmp_path / "no-record")


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


def test_long_stream_labels_its_rows_and_draws_the_plot(tmp_path, capsys):
    import long_stream

    png = tmp_path / "by_position.png"
    argv = ["fresh:titans", "--data", "random", "--length", "256", "--call", "128", "--streams", "1"]
    rows = long_stream.main([*argv, "--labels", "mine", "--plot", str(png)])
    assert "| mine |" in capsys.readouterr().out and rows[0]["label"] == "mine"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # one label per checkpoint
        long_stream.main([*argv, "--labels", "a", "b"])


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

    ps = pretrained_study
    assert ps.main(["plan", "--init", "MODEL", "--root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == len(ps.RUNS) == 2 + len(ps.SHARED) * len(ps.STRATEGIES)  # and the base reading, facts and bbc
    for stream in ps.SHARED:  # every strategy on every stream, the stream's shared settings on each
        lines = [line for line in plan if f"--out-dir {tmp_path}/{stream}-" in line]
        assert len(lines) == len(ps.STRATEGIES) + (stream in ("facts", "bbc"))  # the base reading
        assert all(f"--init MODEL {' '.join(ps.SHARED[stream])} --strategy" in line for line in lines)
    assert ps.main(["plan", "--stream", "bbc", "--init", "MODEL", "--root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == len(ps.STRATEGIES) + 1 and all("--stream bbc" in line for line in plan)
    # each line says what `run` would do with its folder: skip it (done), resume it, or (nothing said) start it
    for folder, file in (("bbc-base-s0", "results.json"), ("bbc-lora-s0", "progress.pt")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / file).write_text("{}")
    assert ps.main(["plan", "--stream", "bbc", "--init", "MODEL", "--root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert plan[0].endswith("bbc-base-s0   # done") and plan[2].endswith(
        "; stopped part-way: `run` resumes it from progress.pt"
    )
    assert sum("#" in line and ("done" in line or "part-way" in line) for line in plan) == 2
    for folder in ("bbc-base-s0", "bbc-lora-s0"):
        shutil.rmtree(tmp_path / folder)
    runs = (
        ("facts-lora-s0", 0.5, 1.10, True),
        ("facts-base-s0", 0.0, 1.05, True),
        ("languages-lora-s0", 1.5, 1.2, False),
        ("facts-lora-s1", 0.3, 1.20, True),
        ("bbc-base-s0", 0.58, 1.05, True),
        ("bbc-lora-s0", 0.7, 1.10, True),
        ("facts-replay-general-s0", 0.2, 1.06, True),
    )
    for name, average, bpb, higher in runs:
        (tmp_path / name).mkdir()
        general = {
            "before": {"wiki_bits_per_byte": 1.05, "squad_f1": 0.3},
            "after": {"wiki_bits_per_byte": bpb, "squad_f1": 0.2},
        }
        result = {
            "config": {"strategy": name.split("-")[1], "few_shot": 0, "stream": name.split("-")[0]}
            | ({"replay_from": "general"} if "general" in name else {}),
            "metric": "exact match" if higher else "bits per byte",
            "higher_is_better": higher,
            "metrics": {"average": average, "forgetting": 0.1, "bwt": -0.1} | ({"fwt": 0.02} if higher else {}),
            "baseline": [0.0, 0.0] if higher else [2.0, 2.0],
            "general": general,
            "trainable_params": 1000,
            "train_tokens_per_s": 50.0,
            "seconds": 600.0,
        }
        (tmp_path / name / "results.json").write_text(json.dumps(result))
    assert ps.main(["report", "--root", str(tmp_path), "--picture", str(tmp_path / "p.png"), "--no-record"]) == 0
    out = capsys.readouterr().out
    assert "**facts** (exact match)" in out and "**languages** (bits per byte)" in out
    assert (
        "| facts-lora-s0 | lora | 0.500 | +0.500 | +0.100 | -0.100 | +0.020 | +0.050 | -0.100 | 1,000 | 50 | 10 |"
        in out
    )
    # bits per byte: the gain is what the stream saved, 2.0 -> 1.5; a run without FWT (older results) says n/a
    assert "| languages-lora-s0 | lora | 1.500 | +0.500 | +0.100 | -0.100 | n/a | +0.150 |" in out
    assert (tmp_path / "p-facts.png").is_file() and (tmp_path / "p-languages.png").is_file()
    # over seeds: mean ± sd (n − 1); SQuAD F1 lost in % of the base's (0.3 -> 0.2: 33%)
    row = "| facts-lora | 2 | 0.400 ± 0.141 | +0.400 ± 0.141 | +0.100 ± 0.000 | -0.100 ± 0.000 | +0.020 ± 0.000 "
    row += "| +0.100 ± 0.071 "
    row += "| 33 ± 0 |"
    assert row in out and "| facts-base | 1 | 0.000 | +0.000 |" in out
    assert "| facts-replay-general-s0 | replay of general text | 0.200 |" in out  # not the replay of tasks
    assert "| facts-replay-general | 1 | 0.200 |" in out
    # the gain is over the stream's base run where there is one (bbc: its last row chooses among every class)
    assert "| bbc-lora-s0 | lora | 0.700 | +0.120 |" in out and "| bbc-base-s0 | base | 0.580 | +0.000 |" in out
    with pytest.raises(SystemExit, match="no \\*/results.json"):
        pretrained_study.report(tmp_path / "empty", None)


def test_pretrained_study_record_keeps_finished_runs_and_rates_for_a_fresh_checkout(tmp_path, capsys, monkeypatch):
    """Run folders are not committed; the record is: `record` copies what a machine measured, and on a machine without
    those folders `report` still gives their rows and `plan`/`run` still use the rates chosen."""
    import pretrained_study as ps

    root, record, fresh = tmp_path / "runs", tmp_path / "record", tmp_path / "fresh"
    for name, average in (("bbc-base-s0", 0.58), ("bbc-lora-s0", 0.22), ("bbc-lora-s1", 0.30)):
        (root / name).mkdir(parents=True)
        result = {
            "config": {"strategy": name.split("-")[1], "stream": "bbc"},
            "metrics": {"average": average, "forgetting": 0.5, "bwt": -0.5, "fwt": 0.0},
            "baseline": [0.7],
            "general": None,
            "seconds": 60.0,
        }
        (root / name / "results.json").write_text(json.dumps(result))
    (root / "bbc-ewc-s0").mkdir()  # stopped part-way: nothing to record
    (root / "bbc-ewc-s0" / "progress.pt").write_text("")
    ps.chosen_path(root).parent.mkdir()
    ps.chosen_path(root).write_text(json.dumps({"facts-lora": 3e-4}))
    assert ps.main(["record", "--root", str(root), "--record", str(record)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert sorted(p.name for p in (record / "results").iterdir()) == [
        "bbc-base-s0.json",
        "bbc-lora-s0.json",
        "bbc-lora-s1.json",
    ]
    assert json.loads((record / "chosen.json").read_text()) == {"facts-lora": 3e-4}
    # a fresh checkout: no run folders, the record's rows and rates
    assert ps.main(["report", "--root", str(fresh), "--record", str(record)]) == 0
    out = capsys.readouterr().out
    assert "| bbc-lora-s1 | lora | 0.300 | -0.280 |" in out and "| bbc-lora | 2 | 0.260 ± 0.057 |" in out
    assert ps.main(["plan", "--stream", "bbc", "--init", "M", "--root", str(fresh), "--record", str(record)]) == 0
    lora = [line for line in capsys.readouterr().out.splitlines() if "bbc-lora-s0" in line][0]
    assert f"--lr 3e-4 --seed 0 --out-dir {fresh}/bbc-lora-s0   # --lr 3e-4: chosen on the first task" in lora
    assert f"({record / 'chosen.json'})" in lora
    # a run folder takes the place of the record's row; --no-record ignores the record
    (fresh / "bbc-lora-s1").mkdir(parents=True)
    (fresh / "bbc-lora-s1" / "results.json").write_text((root / "bbc-lora-s0" / "results.json").read_text())
    assert ps.main(["report", "--root", str(fresh), "--record", str(record)]) == 0
    assert "| bbc-lora-s1 | lora | 0.220 |" in capsys.readouterr().out
    assert ps.main(["report", "--root", str(fresh), "--no-record"]) == 0
    assert "bbc-base-s0" not in capsys.readouterr().out
    assert ps.main(["plan", "--stream", "bbc", "--init", "M", "--root", str(fresh), "--no-record"]) == 0
    assert "RUNS default, not chosen" in capsys.readouterr().out
    # `run` skips what the record has (a folder of its own says done), unless told to ignore the record
    calls = []
    monkeypatch.setattr(ps, "nestlearn", lambda argv: calls.append(argv[argv.index("--out-dir") + 1]) or 0)
    common = ["--init", "M", "--root", str(fresh), "--record", str(record)]
    assert ps.main(["plan", "--stream", "bbc", *common]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert [line.split("   # ")[-1] for line in plan[:2]] == [
        "recorded: `run` skips it (--no-record runs it again)",
        "--lr 1e-4: RUNS default, not chosen: " + str(record / "chosen.json") + " has none for it",
    ]
    assert ps.main(["run", "bbc-base", "bbc-lora", "bbc-ewc", "--seeds", "0", "1", *common]) == 0
    assert calls == [str(fresh / n) for n in ("bbc-ewc-s0", "bbc-base-s1", "bbc-ewc-s1")]
    err = capsys.readouterr().err
    assert "bbc-base-s0 is in the record" in err and "bbc-lora-s1 is done: skipped" in err
    assert "bbc-ewc-s1 done; `record` keeps it" in err
    calls.clear()
    assert ps.main(["run", "bbc-base", "--no-record", "--init", "M", "--root", str(fresh)]) == 0
    assert calls == [str(fresh / "bbc-base-s0")]
    with pytest.raises(SystemExit, match="nor in"):
        ps.report(tmp_path / "empty", None, tmp_path / "no-record")


def _sweep_result(root, name, lr, exact_match, bpb_change, seed=0, tasks=1, general=True, baseline=0.0):
    """A fabricated results.json of a first-task sweep run (the keys pretrained_study reads)."""
    import pretrained_study

    out = pretrained_study.sweep_dir(root, name, lr, seed)
    out.mkdir(parents=True)
    before = {"wiki_bits_per_byte": 1.0, "squad_f1": 0.3}
    after = {"wiki_bits_per_byte": 1.0 + bpb_change, "squad_f1": 0.25}
    result = {
        "config": {"lr": lr, "seed": seed},
        "R": [[exact_match] * tasks] * tasks,
        "baseline": [baseline] * tasks,
        "general": {"before": before, "after": after} if general else None,
        "seconds": 540.0,
    }
    (out / "results.json").write_text(json.dumps(result))


def test_pretrained_study_sweep_trains_the_first_task_alone_at_each_rate(tmp_path, capsys):
    import pretrained_study as ps

    assert ps.grid(1e-4) == [3e-5, 1e-4, 3e-4] and ps.grid(1e-3) == [3e-4, 1e-3, 3e-3]
    assert ps.grid(3e-4) == [1e-4, 3e-4, 1e-3] and ps.lr_text(3e-5) == "3e-5" and ps.lr_text(3.16e-4) == "3.16e-4"
    _sweep_result(tmp_path, "facts-lora", 1e-3, 0.1, 0.0)  # a finished run: marked done, not run again
    assert ps.main(["sweep", "--plan", "--init", "MODEL", "--root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out.splitlines()
    # every run that trains, but EWC and replay, which train as fine-tuning on the first task
    swept = [
        "facts-finetune",
        "facts-lora",
        "facts-cms-levels",
        "facts-adapter",
        "facts-replay-general",
        "facts-memorize",
    ]
    assert len(plan) == 3 * len(swept)
    first_task = " ".join(ps._with(ps.SHARED["facts"], "--tasks", "1"))
    assert all(f"--init MODEL {first_task} --strategy" in line and "--tasks 3" not in line for line in plan)
    outs = [line.split("--out-dir ")[1].split()[0] for line in plan]
    assert len(set(outs)) == len(outs)
    for name, centre in zip(swept, ("1e-4", "1e-3", "1e-4", "1e-3", "1e-4", "1e-3"), strict=True):
        lines = [line for line in plan if f"/sweep/{name}/" in line]
        rates = [line.split("--lr ")[1].split()[0] for line in lines]
        assert len(lines) == 3 and rates[1] == centre and float(rates[0]) < float(centre) < float(rates[2])
        assert all(f"/sweep/{name}/lr{lr}-s0" in line for lr, line in zip(rates, lines, strict=True))
        assert all(" ".join(ps.RUNS[name][1]).split(" --lr")[0] in line for line in lines)
    assert [line.endswith("# done") for line in plan].count(True) == 1 and "/facts-lora/lr1e-3-s0   # done" in plan[4]
    # ewc sweeps fine-tuning; --lrs replaces the grid; the seed names the folders
    assert ps.main(["sweep", "ewc", "--plan", "--lrs", "1e-5,2e-5", "--seed", "3", "--init", "M", "--root", "r"]) == 0
    out, err = capsys.readouterr()
    assert "facts-ewc trains as facts-finetune on the first task" in err
    assert [line.split("--out-dir ")[1] for line in out.splitlines()] == [
        "r/sweep/facts-finetune/lr1e-5-s3",
        "r/sweep/facts-finetune/lr2e-5-s3",
    ]
    assert ps.main(["sweep", "base", "--plan", "--init", "M"]) == 1
    assert "facts-base trains nothing (--strategy none), so it has no rate to choose" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ps.main(["sweep", "--lrs", "1e-4,-1", "--init", "M"])
    assert "'-1' in '1e-4,-1': a learning rate must be a positive number" in capsys.readouterr().err


def test_pretrained_study_rule_chooses_a_rate_that_learns_within_the_damage_bound(tmp_path):
    import pretrained_study as ps

    def chosen(name, root=tmp_path):
        return ps.select(ps.sweep_results(root, name, seed=0))

    # among the learners within the bound the best exact match wins, though a rate over it learned more
    for lr, em, bpb in ((3e-5, 0.1, 0.02), (1e-4, 0.3, 0.08), (3e-4, 0.5, 0.3)):
        _sweep_result(tmp_path, "facts-finetune", lr, em, bpb)
    _sweep_result(tmp_path, "facts-finetune", 1e-4, 0.9, 0.0, seed=1)  # another seed's: not read
    assert chosen("facts-finetune") == (1e-4, "kept")
    # a tie in exact match goes to the smaller rate
    for lr, em, bpb in ((3e-4, 0.3, 0.05), (1e-3, 0.3, 0.01), (3e-3, 0.2, 0.0)):
        _sweep_result(tmp_path, "facts-lora", lr, em, bpb)
    assert chosen("facts-lora") == (3e-4, "kept")
    # every learner over the bound: the one of least damage, a diverged (NaN) run counting as the most
    for lr, em, bpb in ((3e-5, 0.1, float("nan")), (1e-4, 0.4, 0.2), (3e-4, 0.6, 0.5)):
        _sweep_result(tmp_path, "facts-cms-levels", lr, em, bpb)
    assert chosen("facts-cms-levels") == (1e-4, "mildest learner")
    # ... and a tie in damage goes to the smaller rate
    for lr, em in ((3e-4, 0.5), (1e-3, 0.6)):
        _sweep_result(tmp_path, "facts-adapter", lr, em, 0.25)
    assert chosen("facts-adapter") == (3e-4, "mildest learner")
    # the first sweep's fine-tuning (2026-12-05): the rate within the bound learned nothing, so it is not chosen
    for lr, em, bpb in ((3e-5, 0.0, 0.031), (1e-4, 0.281, 0.285), (3e-4, 0.0, 0.704)):
        _sweep_result(tmp_path / "pilot", "facts-finetune", lr, em, bpb)
    assert chosen("facts-finetune", tmp_path / "pilot") == (1e-4, "mildest learner")
    # learning is counted over the untrained model: 0.3 where it already scores 0.25 is no learner
    for lr, em, bpb in ((1e-4, 0.3, 0.0), (3e-4, 0.28, 0.5)):
        _sweep_result(tmp_path / "base", "facts-lora", lr, em, bpb, baseline=0.25)
    # ... so nothing learns: the best exact match, then the least damage
    assert chosen("facts-lora", tmp_path / "base") == (1e-4, "none learns")
    for lr, em, bpb in ((3e-4, 0.031, 0.215), (1e-3, 0.0, 0.858), (3e-3, 0.031, 1.101)):
        _sweep_result(tmp_path / "none", "facts-lora", lr, em, bpb)
    assert chosen("facts-lora", tmp_path / "none") == (3e-4, "none learns")
    rows = ps.sweep_results(tmp_path, "facts-finetune", seed=0)
    assert [(x["lr"], x["exact_match"]) for x in rows] == [(3e-5, 0.1), (1e-4, 0.3), (3e-4, 0.5)]
    assert rows[0]["bpb_change"] == pytest.approx(0.02) and rows[0]["squad_f1_change"] == pytest.approx(-0.05)
    # folders the rule cannot read are refused, naming the fix
    _sweep_result(tmp_path / "a", "facts-lora", 1e-3, 0.1, 0.0, tasks=3)
    with pytest.raises(ValueError, match="trained 3 tasks; a sweep folder holds the first task alone"):
        ps.sweep_results(tmp_path / "a", "facts-lora", 0)
    _sweep_result(tmp_path / "b", "facts-lora", 1e-3, 0.1, 0.0, general=False)
    with pytest.raises(ValueError, match="no wiki bits per byte before and after the task"):
        ps.sweep_results(tmp_path / "b", "facts-lora", 0)
    with pytest.raises(ValueError, match="no finished sweep runs"):
        ps.select([])


def test_pretrained_study_sweep_runs_what_is_missing_and_plan_and_run_use_its_choice(tmp_path, capsys, monkeypatch):
    import pretrained_study as ps

    root, calls = tmp_path / "study", []

    def fake(argv):  # nestlearn continual: exact match and damage rise with the rate
        calls.append(argv)
        out = Path(argv[argv.index("--out-dir") + 1])
        lr = float(argv[argv.index("--lr") + 1])
        (out.parent).mkdir(parents=True, exist_ok=True)
        _sweep_result(root, out.parent.name, lr, min(lr * 1000, 1.0), lr * 300)
        return 0

    monkeypatch.setattr(ps, "nestlearn", fake)
    _sweep_result(root, "facts-finetune", 3e-5, 0.03, 0.009)  # done before: skipped
    assert ps.main(["sweep", "finetune", "--init", "M", "--root", str(root)]) == 0
    out, err = capsys.readouterr()
    assert len(calls) == 2 and all(c[-3:] == ["--threads", "1", "--no-progress"] for c in calls)
    assert "lr3e-5-s0 is done: skipped" in err
    # 1e-4 damages by 0.03 and learns 0.1, 3e-4 damages by 0.09 and learns 0.3: the largest rate within the bound
    assert (
        "| facts-finetune | 3e-4 | 0.300 | +0.300 | +0.090 | -0.050 | 9 | ✓ best exact match with gain ≥ 0.10 and "
        "Δ wiki bpb ≤ 0.10 |" in out
    )
    assert "| facts-finetune | 1e-4 | 0.100 | +0.100 | +0.030 | -0.050 | 9 |  |" in out
    assert "facts-finetune: the largest rate swept was chosen" in out and "facts-ewc: 3e-4, facts-finetune's" in out
    expected = {"facts-finetune": 3e-4, "facts-replay": 3e-4, "facts-ewc": 3e-4}
    assert json.loads(ps.chosen_path(root).read_text()) == expected
    # a second sweep merges its choice; a stopped run chooses nothing
    monkeypatch.setattr(ps, "nestlearn", lambda argv: 130)
    assert ps.main(["sweep", "lora", "--init", "M", "--root", str(root)]) == 130
    assert "stopped (exit 130); nothing chosen" in capsys.readouterr().err
    monkeypatch.setattr(ps, "nestlearn", fake)
    assert ps.main(["sweep", "lora", "--lrs", "1e-4,3e-4", "--init", "M", "--root", str(root)]) == 0
    capsys.readouterr()
    assert json.loads(ps.chosen_path(root).read_text()) == {**expected, "facts-lora": 3e-4}
    # plan: the chosen rates, and says where each rate comes from
    assert ps.main(["plan", "--init", "M", "--root", str(root)]) == 0
    plan = {line.split("--out-dir ")[1].split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert len(plan) == len(ps.RUNS)
    for name in ("facts-finetune", "facts-ewc", "facts-replay", "facts-lora"):
        assert (
            f"--lr 3e-4 --seed 0 --out-dir {root}/{name}-s0   # --lr 3e-4: chosen on the first task"
            in plan[f"{root}/{name}-s0"]
        )
    # every stream takes the rate its strategy was given on the facts stream's first task
    assert "--lr 3e-4 --seed 0" in plan[f"{root}/bbc-ewc-s0"] and "facts-ewc's" in plan[f"{root}/bbc-ewc-s0"]
    assert "--lr 3e-4 --seed 0" in plan[f"{root}/languages-lora-s0"]
    assert "--lr 1e-3 --seed 0" in plan[f"{root}/facts-adapter-s0"]
    assert f"# --lr 1e-3: RUNS default, not chosen: {ps.chosen_path(root)} has none" in plan[f"{root}/facts-adapter-s0"]
    assert "#" not in plan[f"{root}/facts-base-s0"]
    # run: one command, the chosen rate, said on stderr
    calls.clear()
    assert ps.main(["run", "facts-ewc", "--seed", "2", "--init", "M", "--root", str(root)]) == 0
    assert calls[0][calls[0].index("--lr") + 1] == "3e-4" and "--tasks 3" in " ".join(calls[0])
    assert "--out-dir " + str(root / "facts-ewc-s2") in " ".join(calls[0])
    assert "chosen on the first task" in capsys.readouterr().err
    # several runs and seeds in order; a folder with results.json is skipped; a failure stops the rest
    (root / "facts-lora-s1").mkdir()
    (root / "facts-lora-s1" / "results.json").write_text("{}")
    monkeypatch.setattr(ps, "nestlearn", lambda argv: calls.append(argv) or 0)
    calls.clear()
    assert ps.main(["run", "facts-lora", "facts-ewc", "--seeds", "0", "1", "--init", "M", "--root", str(root)]) == 0
    outs = [c[c.index("--out-dir") + 1] for c in calls]
    assert outs == [str(root / n) for n in ("facts-lora-s0", "facts-ewc-s0", "facts-ewc-s1")]
    assert "facts-lora-s1 is done: skipped" in capsys.readouterr().err
    monkeypatch.setattr(ps, "nestlearn", lambda argv: calls.append(argv) or 2)
    calls.clear()
    assert ps.main(["run", "bbc-lora", "bbc-ewc", "--init", "M", "--root", str(root)]) == 2 and len(calls) == 1
    assert "bbc-lora-s0 stopped (exit 2); the same command resumes" in capsys.readouterr().err
    # a chosen.json that names no run that trains is refused, saying how to fix it
    ps.chosen_path(root).write_text(json.dumps({"facts-base": 1e-4}))
    assert ps.main(["plan", "--init", "M", "--root", str(root)]) == 1
    assert "gives a rate to 'facts-base', which is not a run of RUNS that trains" in capsys.readouterr().err


def test_ewc_and_replay_train_as_finetune_on_the_first_task_of_the_full_stream():
    """Why pretrained_study gives EWC and replay fine-tuning's rate, and why the sweep's one-task run stands for the
    full run's first task: the same losses, step for step (a debug model, byte-level)."""
    from nestlearn.evals.continual import run
    from nestlearn.evals.continual_setup import ContinualConfig

    def losses(strategy, tasks):
        config = ContinualConfig(
            stream="facts",
            tasks=[str(tasks)],
            strategy=strategy,
            steps_per_task=3,
            batch_size=2,
            seq_len=64,
            warmup_steps=2,
            people_per_set=1,
            ewc_batches=1,
            replay_batches=1,
            progress=False,
        )
        return [x["loss"] for x in run(config)["losses"]]

    first = losses("finetune", 1)
    assert len(first) == 3 and losses("ewc", 1) == first and losses("replay", 1) == first
    assert losses("finetune", 2)[:3] == first


def test_window_memory_runs_its_steps_in_order_and_reports_the_needle_scores(tmp_path, capsys, monkeypatch):
    import window_memory as wm

    root, calls = tmp_path / "longctx", []

    def fake(argv):  # train: the last checkpoint and metrics; niah: results.json
        calls.append(argv)
        out = Path(argv[argv.index("--out-dir") + 1])
        if argv[0] == "train":
            (out / "checkpoints" / f"step-{wm.TRAIN_STEPS:08d}").mkdir(parents=True)
            lines = [
                {"step": 1, "kind": "train", "loss": 3.0, "tokens_per_s": 40.0},
                {"step": wm.TRAIN_STEPS, "kind": "train", "loss": 2.5, "tokens_per_s": 45.0},
            ]
            (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        else:
            out.mkdir(parents=True)
            window = 256 if "--window" in argv or "-train" in argv[2] else None
            grid = {"score_by_length": [100.0, 50.0, 0.0, 0.0], "recall_by_length": [90.0, 40.0, 1.0, 0.0]}
            grid["gain_by_length"] = [20.0, 9.0, 0.2, 0.0]
            (out / "results.json").write_text(json.dumps({"window": window, "kinds": {"passkey": grid}}))
        return 0

    monkeypatch.setattr(wm, "nestlearn", fake)
    # scoring an adapter that is not trained is refused before anything runs
    assert wm.main(["run", "titans", "--init", "M", "--root", str(root)]) == 1
    assert "not trained yet: run that first" in capsys.readouterr().err and not calls
    assert wm.main(["run", "--init", "M", "--root", str(root)]) == 0
    assert [c[0] for c in calls] == ["longctx", "longctx", "train", "longctx", "train", "longctx"]
    assert calls[1][calls[1].index("--window") + 1] == "256" and "--window" not in calls[0]
    train = calls[2]
    assert train[train.index("--init") + 1] == "M" and train[train.index("--adapter") + 1] == "titans"
    assert all(flag in train for flag in ("--freeze", "--window")) and calls[3][2] == str(root / "titans-train")
    assert all(c[-3:] == ["--threads", "1", "--no-progress"] for c in calls)
    # everything done: plan marks it, run skips it
    calls.clear()
    assert wm.main(["run", "--init", "M", "--root", str(root)]) == 0 and not calls
    assert wm.main(["plan", "--init", "M", "--root", str(root)]) == 0
    plan = capsys.readouterr().out.splitlines()
    assert len(plan) == len(wm.STEPS) and all(line.endswith("# done") for line in plan)
    assert wm.main(["report", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| full | full | 100 / 90.0 (+20.00) | 50 / 40.0 (+9.00) | 0 / 1.0 (+0.20) | 0 / 0.0 (+0.00) |  |" in out
    assert "| titans | 256 |" in out and "48 steps, loss 3.00 → 2.50, 45 tok/s |" in out
    with pytest.raises(SystemExit):
        wm.main(["run", "nope", "--root", str(root)])
