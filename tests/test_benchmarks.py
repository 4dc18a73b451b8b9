"""The benchmark scripts run end to end at toy sizes (their figures are in docs/benchmarks.md, not checked here), so
that a session lent a GPU can run them as they are: `--device cuda` is the same code with a synchronisation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_models_measures_training_and_decoding_in_bf16():
    out = run(
        "bench_models.py",
        "--presets",
        "transformer",
        "titans",
        "--lengths",
        "32",
        "--size",
        "debug",
        "--context",
        "16",
        "--decode",
        "2",
        "--precision",
        "bf16",
    )
    assert "FAILED" not in out and "failed" not in out, out
    assert "| transformer | 32 |" in out and "| titans | 32 |" in out and "1.00x" in out, out
    assert out.count("\n  decode ") == 2, out  # one line per preset


def test_bench_models_measures_a_variant_and_refuses_a_bad_one():
    out = run(
        "bench_models.py",
        "--presets",
        "hope",
        "--lengths",
        "32",
        "--size",
        "debug",
        "--skip-decode",
        "--set",
        "sm_titans.chunk_size=8",
        "sm_titans.memory_chunk_size=16",
    )
    assert "set sm_titans.chunk_size=8 sm_titans.memory_chunk_size=16" in out and "| hope | 32 |" in out, out
    bad = subprocess.run(
        [sys.executable, str(BENCH / "bench_models.py"), "--set", "sm_titans.chunk_size=64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "memory_chunk_size=16: must be a multiple of chunk_size=64" in bad.stderr


def test_bench_memory_compares_chunked_with_reference():
    out = run("bench_memory.py", "--lengths", "32", "--reference-lengths", "32", "--rules", "gd", "--repeats", "1")
    assert "FAILED" not in out and "chunked is" in out, out


def test_device_check_passes_on_cpu():
    # the script a GPU session runs first (docs/benchmarks.md); on CPU its device-vs-CPU comparisons are trivial,
    # its comparisons with the reference, causality, streaming, generation and bf16 training are not
    out = run("device_check.py", "--device", "cpu")
    assert out.rstrip().endswith("0 failed") and "FAIL" not in out, out
    # memory grid, 4 checks per preset, bf16 per preset, continual: 5 strategies, and 4 from a pretrained Llama
    assert out.count("  ok   ") == 16 + 4 * 4 + 4 + 5 + 4, out


def test_bench_models_refuses_a_gpu_it_does_not_have():
    done = subprocess.run(
        [sys.executable, str(BENCH / "bench_models.py"), "--device", "cuda:7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if torch.cuda.device_count() > 7:
        return
    assert done.returncode != 0 and "--device cuda:7" in done.stderr, done.stderr


def test_bench_block_times_and_counts_a_mixer_and_refuses_a_bad_width():
    out = run(
        "bench_block.py",
        "--presets",
        "transformer",
        "hope",
        "--size",
        "debug",
        "--lengths",
        "32",
        "--head-width",
        "8",
        "--repeats",
        "1",
    )
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| hope") or line.startswith("| transf")]
    assert len(rows) == 2, out
    hope_calls = int(rows[1][6].replace(",", ""))
    transformer_calls = int(rows[0][6].replace(",", ""))
    assert rows[1][3].strip() == "8" and hope_calls > 10 * transformer_calls > 0, out  # a loop over chunks vs one pass
    bad = subprocess.run(
        [sys.executable, str(BENCH / "bench_block.py"), "--head-width", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "--head-width [0]: every value must be a positive int" in bad.stderr


def test_bench_shared_cpu_times_the_three_settings():
    out = run("bench_shared_cpu.py", "--presets", "transformer", "--seq-len", "16", "--batch", "2", "--steps", "1")
    assert "| transformer |" in out and out.count(" s") >= 3


def test_bench_pretrained_compares_a_llama_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'nestlearn[hf]'")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as SmolLM2
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    results = tmp_path / "out" / "results.json"
    args = ["--model", str(tmp_path / "llama"), "--lengths", "32", "--repeats", "1", "--adapter-blocks", "1"]
    out = run("bench_pretrained.py", *args, "--json", str(results))
    assert "FAILED" not in out and "failed" not in out, out
    labels = ("forward, no grad | 32 |", "all trainable | 32 |", "last 1 blocks | 32 |", "| frozen base + titans")
    assert all(label in out for label in labels), out
    saved = json.loads(results.read_text())
    assert {(r["workload"], r["impl"]) for r in saved["rows"]} == {
        *((w, impl) for w in ("forward", "train", "frozen") for impl in ("transformers", "nestlearn")),
        ("titans", "nestlearn"),
        ("sm_titans", "nestlearn"),
    }
    assert all(r["peak_mb"] >= 0 and len(r["times_s"]) == 1 and r["others_cores"] >= 0 for r in saved["rows"])
    adapter = next(r for r in saved["rows"] if r["workload"] == "titans")
    assert 0 < adapter["trainable"] < adapter["params"]  # the base frozen, the adapter trained
    bad = subprocess.run(
        [sys.executable, str(BENCH / "bench_pretrained.py"), *args[:2], "--adapter-blocks", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "--adapter-blocks 3: must lie in [1, 2]" in bad.stderr, bad.stderr
