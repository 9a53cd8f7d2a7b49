"""Sequence parallelism on gloo: ring (zigzag vs contiguous), Ulysses and hybrid at a fixed total length.

For each process count in --worlds and each backend, one memo-wrapped Llama (built from a config,
synthetic tokens) trains on the same global sequence of --seq-len tokens, sharded by
memo.parallel.shard_batch: one warm-up step, then --steps timed steps (forward, backward,
all_reduce_gradients). Per rank it records:

  step_s         median step time (each step starts after a barrier)
  attn_s         host seconds in attention block kernels (forward + backward) per step: the
                 compute each rank does for attention. max/min across ranks shows the balance:
                 zigzag should be near 1, contiguous near 2P-1 for causal attention.
  activation     bytes of the storages the forward creates that are still alive when it returns
                 (memo.memtrack, independent of memo's counters), swapping off (keep every layer):
                 what one rank holds for its S/P tokens.

World 1 runs the same op on a group of one rank. Processes get max(1, cores // world) threads: on
a machine with fewer cores than ranks the step times measure oversubscription, not speed-up; the
balance and memory columns do not depend on it.

    python benchmarks/ring.py [--seq-len 4096] [--worlds 1 2 4] [--layers 2] [--hidden 256] [--steps 3] [--json PATH]
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))   # last: benchmarks/copy.py would shadow the standard library's copy module

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from gloo_ranks import run_ranks  # noqa: E402


def backends_for(world: int) -> list[tuple[str, str]]:
    out = [("ring", "zigzag"), ("ring", "contiguous")]
    if world > 1:
        out.append(("ulysses", "zigzag"))
    if world == 4:
        out.append(("hybrid", "zigzag"))
    return out


def worker(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import memo
    from memo.attention import kernels
    from memo.memtrack import track_storages
    from memo.parallel import all_reduce_gradients, shard_batch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 2, num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=2048, use_cache=False,
                      attn_implementation="sdpa")
    ids = torch.randint(0, cfg.vocab_size, (1, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows = []
    for backend, layout in backends_for(world):
        torch.manual_seed(0)
        model = memo.wrap(LlamaForCausalLM(cfg), memo.MemoConfig(
            sequence_parallel_group=dist.group.WORLD, sp_backend=backend, sp_layout=layout,
            ulysses_size=2 if backend == "hybrid" else None, keep_last_layers=args.layers, swap_ratio=1.0,
            host_memory_budget="4GiB"))
        batch = shard_batch({"input_ids": ids, "labels": ids}, group=model)
        times, attn = [], []
        for step in range(args.steps + 1):
            dist.barrier()
            kernels.KERNEL_SECONDS.update(forward=0.0, backward=0.0)
            start = time.perf_counter()
            model(**batch).loss.backward()
            all_reduce_gradients(model)
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            if step:
                times.append(elapsed)
                attn.append(kernels.KERNEL_SECONDS["forward"] + kernels.KERNEL_SECONDS["backward"])
            if rank == 0:
                print(f"  world {world} {backend}/{layout}: step {step}/{args.steps} {elapsed:.2f} s",
                      file=sys.stderr, flush=True)
        with track_storages() as tracker:
            loss = model(**batch).loss
            activation = tracker.alive_bytes()
        loss.backward()
        rows.append({"world": world, "backend": backend, "layout": layout, "rank": rank,
                     "step_s": statistics.median(times), "attn_s": statistics.median(attn),
                     "activation_bytes": activation})
        memo.unwrap(model)
    with open(os.path.join(args.out, f"{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def launch(args, world: int) -> list[dict]:
    out = tempfile.mkdtemp(prefix="memo-ring-bench-")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--seq-len", str(args.seq_len),
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--steps", str(args.steps)]
    return run_ranks(cmd, world, "benchmarks/ring.py", out)


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["world"], r["backend"], r["layout"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "zigzag"))
    base = None
    for world, backend, layout in keys:
        rs = [r for r in rows if (r["world"], r["backend"], r["layout"]) == (world, backend, layout)]
        attn = [r["attn_s"] for r in rs]
        row = {"world": world, "backend": backend, "layout": layout, "ranks": len(rs),
               "step_s": max(r["step_s"] for r in rs), "attn_max_s": max(attn), "attn_min_s": min(attn),
               "attn_balance": max(attn) / min(attn) if min(attn) > 0 else float("inf"),
               "activation_bytes_per_rank": max(r["activation_bytes"] for r in rs)}
        if world == 1 and backend == "ring" and layout == "zigzag":
            base = row
        out.append(row)
    for row in out:
        if base is not None:
            row["step_vs_1"] = row["step_s"] / base["step_s"]
            row["activation_vs_1"] = row["activation_bytes_per_rank"] / base["activation_bytes_per_rank"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the table and every rank's figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if 1 not in args.worlds:
        raise SystemExit("benchmarks/ring.py: --worlds must include 1 (the baseline of the ratios)")
    rows = []
    for world in args.worlds:
        print(f"world {world}: launching {world} gloo process(es)", file=sys.stderr, flush=True)
        rows.extend(launch(args, world))
    table = summarise(rows)
    head = (f"{'ranks':>5} {'backend':>8} {'layout':>10} {'step s':>8} {'vs 1':>6} {'attn max s':>10} "
            f"{'attn min s':>10} {'max/min':>7} {'act MiB/rank':>12} {'vs 1':>6}")
    print(f"seq_len {args.seq_len}, {args.layers} layers, hidden {args.hidden}, {args.steps} timed steps, "
          f"{os.cpu_count()} cores")
    print(head)
    for r in table:
        print(f"{r['world']:>5} {r['backend']:>8} {r['layout']:>10} {r['step_s']:>8.3f} {r['step_vs_1']:>6.2f} "
              f"{r['attn_max_s']:>10.3f} {r['attn_min_s']:>10.3f} {r['attn_balance']:>7.2f} "
              f"{r['activation_bytes_per_rank'] / 2**20:>12.1f} {r['activation_vs_1']:>6.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
                       "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                       "table": table, "per_rank": rows}, f, indent=2)


if __name__ == "__main__":
    main()
