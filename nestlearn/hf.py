"""The Hugging Face Llama layout: a `LlamaForCausalLM` folder's config and weight names, in and out.

A Llama-family model (Llama 2/3, SmolLM2: grouped-query attention, RoPE, RMSNorm, SwiGLU MLP, tied or untied
embeddings) is exactly nestlearn's `transformer` preset at another shape, so a pretrained checkpoint converts to a
`ModelConfig` and a state dict without approximation:

    HF name (per layer i: model.layers.i.…)            nestlearn name (blocks.i.…)
    model.embed_tokens                                 embed
    input_layernorm / post_attention_layernorm         norm1 / norm2
    self_attn.{q,k,v}_proj   (h·d | g·d | g·d, dim)    mixer.qkv    (rows concatenated: q, k, v)
    self_attn.o_proj                                   mixer.proj
    mlp.{gate,up}_proj       (hidden, dim) each        cms.levels.0.up   (rows concatenated: gate, up)
    mlp.down_proj                                      cms.levels.0.down
    model.norm / lm_head                               norm / head (absent when tied)

Both use the rotate-half RoPE convention (pairs x_i, x_{i+d/2}), so q and k need no permutation. Nothing here
imports `transformers`: reading and writing is config.json plus safetensors; `transformers` only checks the result
(tests). Going out, a CMS of several outer levels folds into one MLP where that is exact: the independent variant
Σ_ℓ a_ℓ MLP_ℓ(x) (eq. 74) is one SwiGLU whose hidden units are every level's side by side, down projections
scaled by a_ℓ; a sequential chain of two or more MLPs is not one MLP and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import AttentionConfig, CMSConfig, ModelConfig

__all__ = [
    "SUPPORTED",
    "is_hf_folder",
    "read_hf_config",
    "config_from_hf",
    "state_dict_from_hf",
    "read_hf_weights",
    "hf_config_of",
    "state_dict_to_hf",
    "exportable",
]

SUPPORTED = ("LlamaForCausalLM",)  # architectures whose folders load; others are refused by name
# a pretrained model's training context can be 8K–128K tokens; its nestlearn seq_len (which only decides which CMS
# periods count as outer levels, and the default training window) is capped at this
MAX_SEQ_LEN = 2048


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` holds a Hugging Face model config (config.json with `architectures` or `model_type`)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return False
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not a readable JSON config: {e}") from e


def _rope_theta(hf: dict) -> float:
    # transformers 4 writes rope_theta (and rope_scaling); 5 writes rope_parameters {"rope_theta", "rope_type"}
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(
            f"RoPE type {kind!r} (rope scaling, as Llama 3.1 uses) is not supported: nestlearn's attention applies "
            "plain RoPE; supported: 'default'"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, source: str = "hf") -> ModelConfig:
    """The `transformer` ModelConfig of a `LlamaForCausalLM` config.json. Unsupported features are refused by name."""
    archs = hf.get("architectures") or [hf.get("model_type", "?")]
    if not any(a in SUPPORTED for a in archs):
        raise ValueError(
            f"{source}: architecture {archs} is not supported; nestlearn loads {list(SUPPORTED)} (Llama 2/3, "
            "SmolLM2 and other Llama-layout models)"
        )
    for key, rule in (("attention_bias", "attention without biases"), ("mlp_bias", "an MLP without biases")):
        if hf.get(key):
            raise ValueError(f"{source}: {key}=true is not supported: nestlearn's Llama has {rule}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported: nestlearn's MLP is SwiGLU (silu)")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != dim:
        raise ValueError(
            f"{source}: head_dim={head_dim} × num_attention_heads={heads} != hidden_size={dim}; nestlearn's attention "
            "has head_dim = hidden_size / heads"
        )
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True) and "Mistral" in str(archs):
        raise ValueError(f"{source}: sliding-window Mistral configs are not supported")
    kv = int(hf.get("num_key_value_heads") or heads)
    seq_len = min(int(hf.get("max_position_embeddings") or MAX_SEQ_LEN), MAX_SEQ_LEN)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        seq_len=seq_len,
        mixer="attention",
        attention=AttentionConfig(rope_base=_rope_theta(hf), kv_heads=None if kv == heads else kv),
        cms=CMSConfig(update_periods=(None,), hidden_size=int(hf["intermediate_size"])),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        name=f"pretrained:{hf.get('model_type', 'llama')}",
    )


def read_hf_weights(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of a folder's model.safetensors (or its shards, model.safetensors.index.json), as float32."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif any(path.glob("pytorch_model*.bin")):
        raise ValueError(
            f"{path} holds pytorch_model.bin weights only: nestlearn reads safetensors (convert once with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True))"
        )
    else:
        raise FileNotFoundError(f"{path} has a config.json but no model.safetensors: is the download complete?")
    weights = {}
    for name in files:
        try:
            weights.update(load_file(str(path / name)))
        except Exception as e:  # safetensors raises its own error kinds for truncated or corrupt files
            raise ValueError(f"{path / name} is corrupt or truncated ({e}); fetch or save the model again") from e
    return {k: v.float() for k, v in weights.items()}


def state_dict_from_hf(weights: dict[str, Tensor], config: ModelConfig, source: str = "hf") -> dict[str, Tensor]:
    """nestlearn names for a Llama state dict (see the module docstring); missing or unexpected tensors are errors."""
    w = dict(weights)
    take = lambda name: w.pop(name)  # noqa: E731
    missing = []
    out = {}

    def get(name: str) -> Tensor | None:
        if name not in w:
            missing.append(name)
            return None
        return take(name)

    out["embed.weight"] = get("model.embed_tokens.weight")
    out["norm.weight"] = get("model.norm.weight")
    if config.tie_embeddings:
        w.pop("lm_head.weight", None)  # some exports keep the tied copy
    else:
        out["head.weight"] = get("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[f"blocks.{i}.norm1.weight"] = get(p + "input_layernorm.weight")
        out[f"blocks.{i}.norm2.weight"] = get(p + "post_attention_layernorm.weight")
        qkv = [get(p + f"self_attn.{x}_proj.weight") for x in "qkv"]
        out[f"blocks.{i}.mixer.proj.weight"] = get(p + "self_attn.o_proj.weight")
        mlp = [get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up")]
        out[f"blocks.{i}.cms.levels.0.down.weight"] = get(p + "mlp.down_proj.weight")
        if not missing:
            out[f"blocks.{i}.mixer.qkv.weight"] = torch.cat(qkv, dim=0)
            out[f"blocks.{i}.cms.levels.0.up.weight"] = torch.cat(mlp, dim=0)
    w = {k: v for k, v in w.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer older exports saved
    if missing or w:
        raise ValueError(
            f"{source}: the weights do not match a Llama of this config: missing {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected {sorted(w)[:5]}{' …' if len(w) > 5 else ''}"
        )
    return out


def _fold_levels(config: ModelConfig, sd: dict[str, Tensor], i: int) -> tuple[Tensor, Tensor]:
    """Block i's CMS as one SwiGLU: (up (2·hidden, dim) = [gate; up], down (dim, hidden)), when that is exact."""
    n = len(config.cms.update_periods)
    ups = [sd[f"blocks.{i}.cms.levels.{l}.up.weight"] for l in range(n)]
    downs = [sd[f"blocks.{i}.cms.levels.{l}.down.weight"] for l in range(n)]
    if n == 1:
        return ups[0], downs[0]
    if config.cms.variant != "independent":
        raise ValueError(
            f"a {config.cms.variant} chain of {n} CMS levels is a composition of {n} MLPs, not one MLP: it has no "
            "Llama layout. Export a model whose CMS is one level, or the independent variant (a weighted sum of "
            "levels, which folds into one wider MLP exactly)"
        )
    a = torch.softmax(sd[f"blocks.{i}.cms.agg_logits"], dim=0)  # Agg of eq. 74
    gates = torch.cat([u.chunk(2, dim=0)[0] for u in ups], dim=0)  # (n·hidden, dim)
    up = torch.cat([u.chunk(2, dim=0)[1] for u in ups], dim=0)
    down = torch.cat([a[l] * downs[l] for l in range(n)], dim=1)  # (dim, n·hidden)
    return torch.cat([gates, up], dim=0), down


def exportable(config: ModelConfig) -> str | None:
    """Why a model has no Llama layout, or None when it has one."""
    if config.mixer != "attention":
        return f"its token mixer is {config.mixer!r}; the Llama layout has attention only"
    if config.attention.window is not None:
        return f"its attention has a sliding window ({config.attention.window}); Llama attends to every token"
    if config.adapter is not None:
        return f"it has a {config.adapter} memory adapter, which Llama has no place for"
    if config.lora is not None:
        return "it has LoRA adapters: merge them first (nestlearn.lora.merge_lora(model))"
    if any(p is not None and p < config.cms.outer_from for p in config.cms.update_periods):
        return "it has in-context CMS levels (fast weights per sequence), which Llama has no place for"
    return None


def hf_config_of(config: ModelConfig, sd: dict[str, Tensor], eos_id: int | None = None) -> dict[str, Any]:
    """A `LlamaForCausalLM` config.json for a model that `exportable` accepts."""
    hidden = sd["blocks.0.cms.levels.0.down.weight"].shape[1] if len(config.cms.update_periods) == 1 else None
    if hidden is None:
        hidden = _fold_levels(config, sd, 0)[1].shape[1]
    hf = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": int(hidden),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.attention.kv_heads or config.num_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.attention.rope_base,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if eos_id is not None:
        hf["eos_token_id"] = eos_id
    return hf


def state_dict_to_hf(config: ModelConfig, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Llama names for the state dict of a model that `exportable` accepts (contiguous copies, for safetensors)."""
    h, g, d = config.num_heads, config.attention.kv_heads or config.num_heads, config.head_dim
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[f"blocks.{i}.norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[f"blocks.{i}.norm2.weight"]
        q, k, v = sd[f"blocks.{i}.mixer.qkv.weight"].split([h * d, g * d, g * d], dim=0)
        out.update(
            {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v}
        )
        out[p + "self_attn.o_proj.weight"] = sd[f"blocks.{i}.mixer.proj.weight"]
        up, down = _fold_levels(config, sd, i)
        gate, up = up.chunk(2, dim=0)
        out.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": down})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}
