"""Peak and time of the LM head + loss block with the final norm before the chunked loss or fused into it.

The block memo plan counts as "LM head + loss": from the last decoder layer's output (the final
norm's input, here fixed random fp32 data of --seq-len tokens) through the final norm (Llama's
RMSNorm), the LM head and the causal-LM loss, forward and backward. Two rows, the same tensors:

    norm first   chunked_causal_lm_loss(norm(x), lm_head.weight, labels, chunk_size=C): the norm over
                 the whole sequence first (what MemoConfig(fuse_final_norm=False) runs)
    fused        chunked_causal_lm_loss(x, ..., norm=norm): the norm chunk by chunk inside the loss
                 (NOTE [ Chunked loss with the final norm ] in memo/loss.py; memo.wrap's default)

Per row: one warm-up, the median of ``--steps`` timed runs (rows interleaved), then one run whose
peak is measured by memo.memtrack (the largest total of storages created during it that are alive
at once; the input, the weights and their gradients exist before). Ratios are against ``norm
first`` in the same run.

    python benchmarks/final_norm.py [--seq-len 32768] [--hidden 1024] [--vocab 2048] [--chunk 4096]
                                    [--steps 2] [--json PATH]

About a minute on 2 CPU cores. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import os
import sys

# benchmarks/copy.py would shadow the standard library's `copy` (see benchmarks/tiling.py).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from memo.loss import chunked_causal_lm_loss  # noqa: E402
from memo.memtrack import track_storages  # noqa: E402

ROWS = (("norm first", False), ("fused", True))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(block: dict, fuse: bool, track: bool = False) -> tuple[float, int, float]:
    """(seconds, memtrack peak bytes or 0, loss) of one forward + backward of the block."""
    x, weight, norm, labels, chunk = block["x"], block["weight"], block["norm"], block["labels"], block["chunk"]
    for t in (x, weight, norm.weight):
        t.grad = torch.zeros_like(t)   # gradients exist: the run adds into them, as in training
    gc.collect()
    start = time.perf_counter()
    with (track_storages() if track else contextlib.nullcontext()) as tracker:
        if fuse:
            loss = chunked_causal_lm_loss(x, weight, labels, chunk_size=chunk, norm=norm)
        else:
            loss = chunked_causal_lm_loss(norm(x), weight, labels, chunk_size=chunk)
        loss.backward()
    return time.perf_counter() - start, tracker.peak_bytes if track else 0, loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=4096, help="loss_chunk_size (tokens per chunk)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    norm = LlamaRMSNorm(args.hidden)
    with torch.no_grad():
        norm.weight.add_(torch.randn(args.hidden, generator=g) * 0.1)
    block = {"x": (torch.randn(1, args.seq_len, args.hidden, generator=g) * 2).requires_grad_(),
             "weight": (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).requires_grad_(),
             "labels": torch.randint(0, args.vocab, (1, args.seq_len), generator=g), "norm": norm,
             "chunk": args.chunk}
    for name, fuse in ROWS:
        log(f"[final_norm] {name}: warm up")
        run(block, fuse)
    times: dict[str, list[float]] = {name: [] for name, _ in ROWS}
    for i in range(args.steps):
        for name, fuse in ROWS:
            times[name].append(run(block, fuse)[0])
            log(f"[final_norm] run {i + 1}/{args.steps} {name}: {times[name][-1]:.2f} s")
    rows = []
    for name, fuse in ROWS:
        _, peak, loss = run(block, fuse, track=True)
        rows.append({"row": name, "fused": fuse, "step_s": statistics.median(times[name]),
                     "steps": args.steps, "peak_bytes": peak, "loss": loss})
        log(f"[final_norm] {name}: peak {peak / 2**20:.1f} MiB")
    base = rows[0]
    for r in rows:
        r["peak_vs_norm_first"] = r["peak_bytes"] / base["peak_bytes"]
        r["time_vs_norm_first"] = r["step_s"] / base["step_s"]
    sequence_tensor = args.seq_len * args.hidden * 4
    what = (f"LM head + loss block: RMSNorm, hidden {args.hidden}, vocab {args.vocab}, fp32, {args.seq_len} tokens, "
            f"loss chunk {args.chunk}; one (tokens x hidden) fp32 tensor is "
            f"{sequence_tensor / 2**20:.1f} MiB; {torch.get_num_threads()} threads on "
            f"{platform.processor() or platform.machine()}")
    print(what)
    print(f"{'row':<12} {'run s':>8} {'x first':>8} {'peak MiB':>9} {'x first':>8} {'loss':>10}")
    for r in rows:
        print(f"{r['row']:<12} {r['step_s']:>8.2f} {r['time_vs_norm_first']:>8.2f} {r['peak_bytes'] / 2**20:>9.1f} "
              f"{r['peak_vs_norm_first']:>8.2f} {r['loss']:>10.6f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": what, "args": vars(args), "sequence_tensor_bytes": sequence_tensor, "rows": rows},
                      f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
