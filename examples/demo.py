"""memo's demo: train a small Llama on synthetic long sequences with memo, and show what it saved.

    python examples/demo.py                      # 4 layers, hidden 256, 8192 tokens, 3 steps
    python examples/demo.py --seq-len 16384 --json demo.json

The model is built from a config (no download). The data are one random 64-token motif repeated
along the sequence, the same every step, so the loss falls within a few steps. Before training, one forward
of the plain model and one of the wrapped model run under memo.memtrack, which counts the bytes
of activation storages still alive after the forward without asking memo.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import memo
from memo.memtrack import track_storages
from memo.planner.units import format_bytes


def synthetic_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    motif = torch.randint(0, vocab, (batch, 64), generator=generator)
    return motif.repeat(1, -(-seq // 64))[:, :seq].contiguous()


def resident_after_forward(model, ids) -> int:
    """Bytes of storages created by the forward and still alive when it returns (the autograd graph's)."""
    with track_storages() as tracker:
        loss = model(input_ids=ids, labels=ids).loss
    alive = tracker.alive_bytes()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return alive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--swap-ratio", default="auto", help="a float in [0, 1] or 'auto'")
    p.add_argument("--keep-last-layers", type=int, default=1)
    p.add_argument("--loss-chunk-size", type=int, default=2048)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 16 * 16,
                         num_hidden_layers=args.layers, num_attention_heads=max(args.hidden // 64, 1),
                         num_key_value_heads=max(args.hidden // 128, 1), vocab_size=args.vocab,
                         max_position_embeddings=max(args.seq_len, 4096), use_cache=False,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    plain = copy.deepcopy(model)
    ratio = args.swap_ratio if args.swap_ratio == "auto" else float(args.swap_ratio)
    memo.wrap(model, memo.MemoConfig(swap_ratio=ratio, keep_last_layers=args.keep_last_layers,
                                     loss_chunk_size=args.loss_chunk_size, host_memory_budget="4GiB"))
    gen = torch.Generator().manual_seed(1)
    print(f"memo demo: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, "
          f"{args.seq_len} tokens per sequence, swap_ratio={args.swap_ratio}", file=sys.stderr)

    print("measuring activations resident after one forward (plain model, then memo) ...", file=sys.stderr)
    probe = synthetic_batch(1, args.seq_len, args.vocab, gen)
    plain_bytes = resident_after_forward(plain, probe)
    del plain
    memo_bytes = resident_after_forward(model, probe)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []
    for step in range(args.steps):
        ids = probe
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        steps.append({"step": step, "loss": loss.item(), "step_s": elapsed})
        print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  {elapsed:.2f} s", file=sys.stderr)

    stats = memo.stats(model)
    print()
    print(stats)
    print()
    print(f"activation bytes resident after forward (measured by memo.memtrack, LM head and loss included):")
    print(f"  plain model        {format_bytes(plain_bytes):>12}")
    print(f"  memo               {format_bytes(memo_bytes):>12}  ({memo_bytes / plain_bytes:.1%} of plain)")
    print(f"  host pool reserved {format_bytes(stats.host_pool['reserved_bytes']):>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "steps": steps, "plain_resident_bytes": plain_bytes,
                       "memo_resident_bytes": memo_bytes, "stats": stats.to_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
