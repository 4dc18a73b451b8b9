"""`nestlearn generate CHECKPOINT --prompt TEXT`: continue a prompt, printing text as it is produced."""

from __future__ import annotations

import sys
import time

import torch

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..model import sample_next
from ..options import add_device, add_threads, non_negative_float, non_negative_int, parser, positive_int
from ..runtime import flush_subnormals, resolve_device, set_threads


def main(argv: list[str]) -> int:
    p = parser("nestlearn generate", "Continue a prompt with a checkpoint, printing text as it is produced.")
    p.add_argument("checkpoint", help="a checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=non_negative_int, default=200, help="(default: 200)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample among the k likeliest tokens (default: 50)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    add_device(p)
    add_threads(p)
    args = p.parse_args(argv)

    device = resolve_device(args.device)
    set_threads(args.threads, device)
    flush_subnormals(device)
    model, tokenizer = load_checkpoint(resolve_checkpoint(args.checkpoint), device)
    model.eval()
    ids = tokenizer.encode(args.prompt)
    if not ids:
        p.error("--prompt is empty")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced, shown, t0 = [], "", time.perf_counter()
    with torch.no_grad():
        logits, state = model(torch.tensor([ids], device=device))
        for _ in range(args.max_new_tokens):
            nxt = sample_next(logits, args.temperature, args.top_k, generator)
            produced.append(int(nxt))
            text = tokenizer.decode(produced)
            # hold back a trailing replacement character: it may be a multi-byte character still arriving
            ready = text.rstrip("\ufffd")
            sys.stdout.write(ready[len(shown) :])
            sys.stdout.flush()
            shown = ready
            logits, state = model(nxt, state)
    seconds = time.perf_counter() - t0
    sys.stdout.write(text[len(shown) :] if produced else "")
    print(f"\n[{len(produced)} tokens, {len(produced) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0
