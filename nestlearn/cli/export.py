"""`nestlearn export CHECKPOINT OUT`: a checkpoint as a Hugging Face Llama folder that `transformers` loads."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..lora import lora_parameters, merge_lora
from ..options import parser


def main(argv: list[str]) -> int:
    p = parser(
        "nestlearn export",
        "Write a checkpoint in the Hugging Face LlamaForCausalLM layout (config.json, model.safetensors, "
        "tokenizer.json): a Transformer, or Hope-Attention with outer CMS levels only (several levels fold into one "
        "MLP when they are combined by the independent variant). LoRA adapters are merged first. Other models are "
        "refused with the reason, and nothing is written (docs/pretrained.md).",
    )
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("out", help="the folder to write (created; files in it are replaced)")
    args = p.parse_args(argv)
    source = resolve_checkpoint(args.checkpoint)
    out = Path(args.out)
    if out.resolve() == source.resolve():
        p.error(f"{out} is the checkpoint itself: export into another folder")
    model, tokenizer = load_checkpoint(source)
    merged = bool(lora_parameters(model))
    if merged:
        merge_lora(model)  # W + (alpha / rank) B A: the layout has no place for the factors
    model.save_pretrained(out, format="hf", tokenizer=tokenizer)
    print(f"exported {source} to {out}" + (" (LoRA merged)" if merged else ""))
    return 0
