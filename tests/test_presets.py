"""How equal the presets' parameter counts are, exactly as README.md, nestlearn/presets.py and docs/deviations.md §17
state it: at `tiny` and above within 1% of the size's name and of one another, at `mini` within 2% of the name and
3% of one another, at `debug` not matched; and the table of counts in docs/deviations.md is the presets' own."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch

from nestlearn import build, presets

ROOT = Path(__file__).resolve().parents[1]
MATCHED = ["tiny", "170m", "340m", "760m", "1.3b"]  # within 1% of the name and of one another
MINI_FROM_NAME, MINI_SPREAD = 0.02, 0.03  # the bounds the docs state at `mini`


@cache
def counts(size: str) -> dict[str, int]:
    with torch.device("meta"):
        return {name: build(make(size)).num_parameters() for name, make in presets.PRESETS.items()}


def spread(size: str) -> float:
    """Largest / smallest − 1 over the presets."""
    return max(counts(size).values()) / min(counts(size).values()) - 1


def from_name(size: str) -> float:
    """The largest |count / name − 1| over the presets."""
    target = presets.SIZES[size][-1]
    return max(abs(n / target - 1) for n in counts(size).values())


@pytest.mark.parametrize("size", MATCHED)
def test_within_one_percent_of_the_name_and_of_each_other(size):
    assert spread(size) <= 0.01, counts(size)
    assert from_name(size) <= 0.01, counts(size)


def test_mini_within_the_documented_bounds_and_not_within_one_percent():
    assert spread("mini") <= MINI_SPREAD and from_name("mini") <= MINI_FROM_NAME, counts("mini")
    # the docs say the 1% claim does not hold at mini: if the presets come to match there, say so in the docs
    assert spread("mini") > 0.01, counts("mini")


def test_debug_is_not_matched():
    assert presets.SIZES["debug"][-1] is None
    assert counts("debug")["hope"] > 2 * counts("debug")["transformer"]  # "2.9x" in docs/deviations.md


def test_the_table_in_the_docs_is_the_presets_counts():
    text = (ROOT / "docs" / "deviations.md").read_text()
    section = text[text.index("### 17. Model sizes") : text.index("### 18.")]
    table = {}
    for size, cells in re.findall(r"^\s*\| `([\w.]+)` \|(.*)\|\s*$", section, flags=re.M):
        cells = [c.strip() for c in cells.split("|")]
        table[size] = cells
    assert list(table) == list(presets.SIZES)
    for size, cells in table.items():
        written = {
            name: int(re.match(r"[\d,]+", cell).group().replace(",", ""))
            for name, cell in zip(presets.PRESETS, cells, strict=False)
        }
        assert written == counts(size), f"docs/deviations.md §17, `{size}`: update the table to {counts(size)}"
        assert cells[4] == f"{100 * spread(size):.2f}%", size
    readme = (ROOT / "README.md").read_text()
    for size, name in [
        ("debug", "transformer"),
        ("debug", "hope"),
        ("mini", "transformer"),
        ("mini", "hope_attention"),
    ]:
        assert f"{counts(size)[name]:,}" in readme, (size, name)


@pytest.mark.parametrize("preset", ["hope", "hope_attention"])
def test_either_cms_signal_is_solved_for_the_size(preset):
    # task-loss levels by default; --cms-signal local gives the local levels' own fit, not the task fit's width
    from nestlearn.train_config import TrainConfig, model_config_of

    target = presets.SIZES["tiny"][-1]
    for signal in ("task", "local"):
        config = presets.PRESETS[preset]("tiny", signal=signal)
        assert config.cms.signal == signal
        with torch.device("meta"):
            assert abs(build(config).num_parameters() / target - 1) <= 0.01, (preset, signal)
        chosen = model_config_of(TrainConfig(preset=preset, size="tiny", cms_signal=signal), 256)
        assert (chosen.num_layers, chosen.cms.hidden_mult, chosen.cms.hidden_size, chosen.cms.signal) == (
            config.num_layers,
            config.cms.hidden_mult,
            config.cms.hidden_size,
            signal,
        )
    assert presets.PRESETS[preset]("tiny").cms.signal == "task"
