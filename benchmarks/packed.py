"""Packed documents: one training step's peak memory and time against the number of documents.

One memo-wrapped Llama (built from a config, fixed seeds, synthetic token ids) trains on --seq-len
tokens packed as N documents of equal length (position_ids restarting at 0 at each), for N in
--docs, on one process and under ring sequence parallelism over 2 gloo processes (memo.parallel.
shard_batch). N = 1 is one sequence, given without position_ids: the baseline of the ratios, in the
same process. Swap ratio --swap-ratio, MemoConfig's default kept layers.

Per row: one warm-up step, the median of --steps timed steps (forward, backward; rows interleaved so
that machine noise spreads over all of them; under SP each step starts after a barrier, and the
slowest rank counts), then one untimed step whose peak is measured by memo.memtrack (the largest
total of live storages created during the step, independent of memo's own counters; parameter
gradients exist before it). memtrack does not see inside one op, and memo's attention op is one op,
so its own transients are measured apart: its forward and backward functions run under memtrack on
one layer's q, k, v and document ids, and what they hold beyond the outputs they return (which the
step's peak counts) is ``attn_internal``. ``peak + attn`` adds the two, an upper bound
on the step's peak with the op's inside counted; on one process the baseline runs SDPA's kernel,
whose inside memtrack cannot see either (counted 0).

    python benchmarks/packed.py [--seq-len 16384] [--docs 1 8 64] [--worlds 1 2] [--layers 3]
                                [--hidden 64] [--steps 3] [--json benchmarks/results/packed.json]

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.append(sys.path.pop(0))   # last: benchmarks/copy.py would shadow the standard library's copy module

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from gloo_ranks import run_ranks  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batch_for(torch, args, docs: int) -> dict:
    """input_ids, labels (no label across a document boundary) and, packed, position_ids."""
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(1))
    if docs == 1:
        return {"input_ids": ids, "labels": ids}
    if args.seq_len % docs:
        raise SystemExit(f"benchmarks/packed.py: {docs} documents do not divide --seq-len {args.seq_len}")
    n = args.seq_len // docs
    labels = ids.clone()
    labels[0, ::n] = -100   # the first token of each document is predicted by no token of its own document
    positions = torch.arange(n).repeat(docs).unsqueeze(0)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def attention_internal_peak(torch, model, batch: dict, world: int) -> int:
    """Peak of memo's attention op's own forward + backward on one layer's shapes (0: SDPA runs instead)."""
    from memo.attention.ulysses import sp_backward, sp_forward
    from memo.memtrack import track_storages
    runtime = model._memo_runtime
    binding = runtime.sp_binding
    if binding.doc is None and runtime.sp is None:
        return 0
    cfg = model.config
    h, kvh, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    s = batch["input_ids"].shape[1]
    g = torch.Generator().manual_seed(2)
    q, dout = (torch.randn(1, h, s, d, generator=g) for _ in range(2))
    k, v = (torch.randn(1, kvh, s, d, generator=g) for _ in range(2))
    with track_storages() as forward:
        out, lse = sp_forward(binding.sp, q, k, v, binding.doc, causal=True, scale=d ** -0.5)
    with track_storages() as backward:
        grads = sp_backward(binding.sp, dout, q, k, v, out, lse, binding.doc, causal=True, scale=d ** -0.5)
    # what the op holds beyond the outputs memtrack sees it return from outside (counted in the step's peak)
    return max(forward.peak_bytes - _bytes(out, lse), backward.peak_bytes - _bytes(*grads))


def _bytes(*tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in {t.untyped_storage()._cdata: t for t in tensors}.values())


def worker(args) -> None:
    import datetime

    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import memo
    from memo.memtrack import track_storages
    from memo.parallel import all_reduce_gradients, shard_batch

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1200))
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab, use_cache=False,
                      max_position_embeddings=args.seq_len, attn_implementation="sdpa")
    models, batches = {}, {}
    for docs in args.docs:
        torch.manual_seed(0)
        config = memo.MemoConfig(swap_ratio=args.swap_ratio, host_memory_budget="8GiB",
                                 **({"sequence_parallel_size": world} if world > 1 else {}))
        models[docs] = memo.wrap(LlamaForCausalLM(copy.deepcopy(cfg)).train(), config)   # wrap edits its config
        batch = batch_for(torch, args, docs)
        batches[docs] = shard_batch(batch, group=models[docs]) if world > 1 else batch

    def step(docs) -> float:
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        models[docs](**batches[docs]).loss.backward()
        if world > 1:
            all_reduce_gradients(models[docs])
        return time.perf_counter() - start

    times: dict[int, list[float]] = {d: [] for d in args.docs}
    for i in range(args.steps + 1):
        for docs in args.docs:
            elapsed = step(docs)
            if i:
                times[docs].append(elapsed)
            if rank == 0:
                log(f"[packed] world {world}, {docs} doc(s): step {i}/{args.steps} {elapsed:.2f} s")
    rows = []
    for docs in args.docs:
        model = models[docs]
        model.zero_grad(set_to_none=False)   # gradients exist: the step adds into them in place
        with track_storages() as tracker:
            loss = model(**batches[docs]).loss
            loss.backward()
            del loss
        internal = attention_internal_peak(torch, model, batches[docs], world)
        rows.append({"world": world, "rank": rank, "docs": docs, "step_s": statistics.median(times[docs]),
                     "steps": args.steps, "peak_bytes": tracker.peak_bytes, "attn_internal_bytes": internal,
                     "packed": model._memo_runtime.sp_binding.doc is not None})
        if rank == 0:
            log(f"[packed] world {world}, {docs} doc(s): peak {tracker.peak_bytes / 2**20:.1f} MiB, "
                f"attention op inside {internal / 2**20:.1f} MiB")
    with open(os.path.join(args.out, f"{rank}.json"), "w") as f:
        json.dump(rows, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def launch(args, world: int) -> list[dict]:
    out = tempfile.mkdtemp(prefix="memo-packed-bench-")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--out", out, "--seq-len", str(args.seq_len),
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--steps", str(args.steps), "--swap-ratio", str(args.swap_ratio), "--docs", *map(str, args.docs)]
    return run_ranks(cmd, world, "benchmarks/packed.py", out)


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for world in sorted({r["world"] for r in rows}):
        base = None
        for docs in sorted({r["docs"] for r in rows if r["world"] == world}):
            rs = [r for r in rows if (r["world"], r["docs"]) == (world, docs)]
            row = {"world": world, "docs": docs, "ranks": len(rs), "packed": rs[0]["packed"],
                   "step_s": max(r["step_s"] for r in rs), "steps": rs[0]["steps"],
                   "peak_bytes": max(r["peak_bytes"] for r in rs),
                   "attn_internal_bytes": max(r["attn_internal_bytes"] for r in rs),
                   "bound_bytes": max(r["peak_bytes"] + r["attn_internal_bytes"] for r in rs)}
            base = base or row
            row["time_vs_one_sequence"] = row["step_s"] / base["step_s"]
            row["peak_vs_one_sequence"] = row["peak_bytes"] / base["peak_bytes"]
            row["bound_vs_one_sequence"] = row["bound_bytes"] / base["bound_bytes"]
            table.append(row)
    return table


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--docs", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--swap-ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None, help="write the table and every rank's figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.docs[0] != 1:
        raise SystemExit("benchmarks/packed.py: --docs must start with 1 (one sequence: the baseline of the ratios)")
    rows = []
    for world in args.worlds:
        log(f"[packed] world {world}: launching {world} process(es)")
        rows.extend(launch(args, world))
    table = summarise(rows)
    what = (f"Llama hidden {args.hidden}, MLP {4 * args.hidden}, {args.layers} layers, 4 heads (2 kv), vocab "
            f"{args.vocab}, fp32, {args.seq_len} tokens in N equal documents, batch 1, swap ratio {args.swap_ratio}; "
            f"{os.cpu_count()} cores on {platform.processor() or platform.machine()}, median of {args.steps} steps")
    print(what)
    print(f"{'ranks':>5} {'docs':>5} {'step s':>8} {'x 1 seq':>8} {'peak MiB':>9} {'x 1 seq':>8} {'attn MiB':>9} "
          f"{'peak+attn':>9} {'x 1 seq':>8}")
    for r in table:
        print(f"{r['world']:>5} {r['docs']:>5} {r['step_s']:>8.2f} {r['time_vs_one_sequence']:>8.2f} "
              f"{r['peak_bytes'] / 2**20:>9.1f} {r['peak_vs_one_sequence']:>8.2f} "
              f"{r['attn_internal_bytes'] / 2**20:>9.1f} {r['bound_bytes'] / 2**20:>9.1f} "
              f"{r['bound_vs_one_sequence']:>8.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"what": what, "args": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
                       "table": table, "per_rank": rows}, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
