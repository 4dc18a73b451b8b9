"""The `facts` stream of `nestlearn continual` (new knowledge: one set of invented people's facts per task, scored by
exact match), the base alone (`--strategy none`, with the set's statements in its prompts), and general ability
measured before and after a stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestlearn.cli import main as cli
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.evals.continual import ContinualConfig, make_stream, run
from nestlearn.evals.streams import FactsTask

from .test_continual import small
from .test_general import cache  # noqa: F401  (the fixture: a cache holding a fake SQuAD)


def facts_run(**fields) -> ContinualConfig:
    return small(**{"stream": "facts", "tasks": ["2"], "people_per_set": 2, **fields})


def test_a_facts_task_trains_on_its_biographies_and_asks_questions_worded_otherwise():
    tasks = make_stream("facts", ["2"], None, 32, tokenizer=ByteTokenizer(), people_per_set=2)
    assert [t.name for t in tasks] == ["facts-1", "facts-2"] and all(isinstance(t, FactsTask) for t in tasks)
    text = ByteTokenizer().decode(tasks[0].tokens.tolist())
    for item in tasks[0].facts.test:
        assert item.answers[0] in text and item.question not in text
    assert not set(tasks[0].facts.documents) & set(tasks[1].facts.documents)
    x, mask = tasks[0].batch(np.random.default_rng(0), 3, 32)
    assert x.shape == (3, 33) and x.dtype == torch.int64 and mask.all()


def test_the_facts_stream_scores_exact_match_after_every_task():
    result = run(facts_run(strategy="finetune"))
    assert result["tasks"] == ["facts-1", "facts-2"] and result["metric"] == "exact match"
    assert result["higher_is_better"] and len(result["R"]) == 2 and len(result["losses"]) == 6
    assert all(0.0 <= v <= 1.0 for row in [result["baseline"], *result["R"]] for v in row)
    assert result["train_tokens_per_s"] > 0


def test_the_base_alone_learns_nothing_and_every_row_is_its_own():
    result = run(facts_run(strategy="none", few_shot=2))
    assert result["losses"] == [] and result["R"] == [result["baseline"]] * 2 and result["trainable_params"] == 0
    assert result["config"]["few_shot"] == 2


def test_general_ability_is_measured_before_and_after_the_stream(cache):  # noqa: F811
    result = run(facts_run(strategy="finetune", tasks=["1"], general_qa=2, data_root=str(cache)))
    general = result["general"]
    assert general["before"]["squad_items"] == 2 and general["after"]["squad_items"] == 2
    assert general["before"]["wiki_bits_per_byte"] is None  # --general-tokens 0: left out
    assert "squad_predictions" not in general["before"]
    none = run(facts_run(strategy="none", tasks=["1"], general_qa=2, data_root=str(cache)))
    assert none["general"]["after"] == none["general"]["before"]  # the same model: measured once


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stream": "languages", "few_shot": 2}, "needs --stream facts"),
        ({"tasks": ["two"]}, "number of fact sets"),
        ({"people_per_set": 0}, "people_per_set"),
        ({"general_qa": -1}, "general_qa"),
    ],
)
def test_bad_facts_settings_are_refused_naming_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        run(facts_run(**fields))


def test_the_continual_command_runs_the_facts_stream(tmp_path, capsys):
    args = ["continual", "--stream", "facts", "--tasks", "1", "--people-per-set", "1", "--strategy", "none"]
    args += ["--few-shot", "2", "--seq-len", "32", "--no-progress", "--out-dir", str(tmp_path / "run")]
    assert cli(args) == 0
    assert "exact match: average" in capsys.readouterr().out and (tmp_path / "run" / "results.json").is_file()
