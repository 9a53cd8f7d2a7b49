"""Step time, peak memory and MFU of memo against HF checkpointing on a GPU (issue 8, item 6).

Rows, per model shape and sequence length (batch 1, bf16, forward + backward with labels, no
optimizer step -- as in memo's measured H100 runs):

    none              no memory saving (HF's own loss)
    hf-ckpt           HF activation checkpointing on every decoder layer (use_reentrant=False)
    hf-ckpt-offload   the same with ``offload=True`` (checkpointed inputs in pinned host memory)
    memo-R            memo.wrap(model, MemoConfig(swap_ratio=R)) for R in --ratios (memo's chunked loss)
    memo-auto         swap_ratio="auto" (warm-up until auto has settled: NOTE [ Auto swap ratio ])
    memo-R-expandable memo-R under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (issue 10)
    memo-R-planned    memo-R with MemoConfig(planned_memory=True): a plan made in the row's process by
                      ``memo plan --no-mip`` (mip is optional), memo's arena allocator installed before
                      CUDA starts; peaks from the arena and its fallback pool (NOTE [ Planned memory at
                      run time ]), since torch.cuda's memory counters do not see a pluggable allocator

Shapes are built from configs, never downloaded: ``tinyllama`` (TinyLlama-1.1B: 22 layers, hidden
2048, GQA 32/4, intermediate 5632, vocab 32000) and ``llama2-7b`` (32 layers, 4096, MHA 32,
11008, vocab 32000). Every row runs in a fresh subprocess, so an out-of-memory row (recorded as
"out of memory") or a crash leaves the others clean. Per row: --warmup steps (memo-auto one more:
it re-solves from a steady-state step), then the median of --steps timed steps; peak =
``torch.cuda.max_memory_allocated`` over a timed step (weights and gradients included) and
``max_memory_reserved`` beside it (their ratio is the allocator's fragmentation);
MFU = model FLOPs (memo.planner.cost.model_flops_per_step) / (step time x peak TFLOP/s).
Ratios are against ``none`` and ``hf-ckpt`` of the same shape and length, measured in this run.

Profile (memo rows): one more step under torch.profiler; the compute stream's busy and idle time
and its gaps (NOTE [ Compute-stream gaps ]).

    python benchmarks/gpu_step.py --quick --json benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --shapes tinyllama --seq-lens 16K 32K 64K 128K --json PATH
    python benchmarks/gpu_step.py --device cpu --tiny --json PATH      # the same code path, seconds

Without a GPU (and without --device cpu) it exits with code 2 and says why. Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)   # benchmarks/copy.py would shadow the standard library's copy module

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Optional  # noqa: E402

SHAPES = {
    "tinyllama": dict(layers=22, hidden=2048, intermediate=5632, heads=32, kv_heads=4, vocab=32000),
    "llama2-7b": dict(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000),
    # --tiny: 3 layers, so that with memo's keep_last_layers=2 one layer swaps and recomputes.
    "tiny": dict(layers=3, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=128),
}
BASELINES = ("none", "hf-ckpt", "hf-ckpt-offload")
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
# --quick: the targets in one command of ~6 minutes on an H100 (step times of RESULTS.md:
# TinyLlama 32K ~1.6 s, Llama-2-7B 64K ~15 s; each subprocess adds ~15 s of start-up and build).
QUICK = [("tinyllama", 32768, ["none", "hf-ckpt", "memo-0", "memo-0.2", "memo-auto"]),
         ("llama2-7b", 65536, ["hf-ckpt", "memo-0", "memo-auto"])]
# --fragmentation: issue 10's rows, allocated vs reserved under each allocator, at the longest
# lengths RESULTS.md saw fit (TinyLlama 128K: ~16 s a step; Llama-2-7B 64K: ~15 s).
FRAGMENTATION = [(shape, seq, ["memo-0", "memo-0-expandable", "memo-0-planned"])
                 for shape, seq in (("tinyllama", 131072), ("llama2-7b", 65536))]
VARIANTS = ("expandable", "planned")
AUTO_MAX_EXTRA_WARMUP = 8   # auto settles in 3-5 steps (warm-up, measure, steady, up to two neighbours)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A800": 312.0}   # dense bf16
OOM = "out of memory"
PROGRESS = "  gpu_step: "      # a worker's progress lines, which the driver passes on


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_tokens(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 1024, "M": 1 << 20}.get(t[-1:], 1)
    try:
        return int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read token count {text!r}; use e.g. 32768, 32K or 1M") from None


def method_names(ratios) -> list[str]:
    return list(BASELINES) + [f"memo-{r:g}" for r in ratios] + ["memo-auto"] + \
        [f"memo-{r:g}-{v}" for v in VARIANTS for r in ratios]


def parse_method(method: str) -> tuple[str, Optional[str], Optional[str]]:
    """``memo-0.2-planned`` -> ("memo", "0.2", "planned"); ``hf-ckpt`` -> ("hf-ckpt", None, None)."""
    if not method.startswith("memo-"):
        return method, None, None
    parts = method.split("-")
    return "memo", parts[1], parts[2] if len(parts) > 2 else None


# --- the worker: one row in its own process --------------------------------------------------

def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def _build(shape: dict, seq: int, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      max_position_embeddings=max(seq, 4096), use_cache=False, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, cfg


def _prepare(model, method: str, host_budget: str, plan: Optional[str] = None) -> None:
    import memo
    kind, ratio, _ = parse_method(method)
    if kind.startswith("hf-ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            **({"offload": True} if method == "hf-ckpt-offload" else {}))
    elif kind == "memo":
        memo.wrap(model, memo.MemoConfig(swap_ratio=ratio if ratio == "auto" else float(ratio),
                                         host_memory_budget=host_budget, plan=plan, planned_memory=plan is not None))


def _make_plan(cfg, seq: int, ratio: str, host_budget: str, workdir: str) -> str:
    """A plan for the row's model from ``memo plan`` (greedy layouts, no MIP: mip is optional), made on
    the CPU before this process touches CUDA. Optimizer states are planned on the host: the benchmark
    steps without an optimizer, and only the layer arenas (Level 1) are served at run time."""
    cfg.save_pretrained(workdir)
    out = os.path.join(workdir, "plan.json")
    cmd = [sys.executable, "-m", "memo.cli.main", "plan", "--model", os.path.join(workdir, "config.json"),
           "--seq-len", str(seq), "--gpus", "1", "--sp", "1", "--gpu", "h100", "--host-memory", host_budget,
           "--swap-ratio", ratio, "--offload-optimizer", "--no-mip", "--out", out]
    # cwd: `-m` puts the working directory first on sys.path, and a checkout's memo/ (no memo.planner,
    # no memo._C) would hide the build on PYTHONPATH.
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
    if not os.path.exists(out):
        raise RuntimeError(f"memo plan made no plan (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    return out


# NOTE [ Compute-stream gaps ]
#   1. The compute stream is the stream with the most kernel time in the profiled step (memo's
#      copies run on their own streams). On the CPU the "kernels" are the profiled ops of the
#      thread that ran the step: the same code path, with host times.
#   2. A gap is the time between the end of one kernel (the latest end so far: kernels may
#      overlap in the trace) and the start of the next. idle_s is their sum over the step;
#      gaps shorter than 50 us (launch latency) are counted in idle_s but not listed.
#   3. Per layer: a step holds 2 x layers layer phases (forward, then backward) and memo's waits
#      recur once per phase, so ``gaps_over_1ms_per_layer`` is the count of gaps over 1 ms over
#      the phases (1.0: one such stall per layer phase) and ``longest_gap_s`` the longest single
#      wait. Gaps are not attributed to named layers (that needs layer markers on the GPU timeline).
def stream_gaps(intervals: list[tuple[float, float]], layer_phases: int, min_gap_s: float = 50e-6) -> dict:
    """Busy/idle summary of one stream's kernel intervals (seconds). NOTE [ Compute-stream gaps ]."""
    if not intervals:
        return {"kernels": 0, "busy_s": 0.0, "idle_s": 0.0, "span_s": 0.0, "gaps_over_0.5ms": 0,
                "longest_gap_s": 0.0, "gaps_over_1ms_per_layer": 0.0, "top_gaps_s": []}
    intervals = sorted(intervals)
    busy = idle = 0.0
    gaps = []
    cur_start, cur_end = intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            gap = start - cur_end
            idle += gap
            if gap >= min_gap_s:
                gaps.append(gap)
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    gaps.sort(reverse=True)
    return {"kernels": len(intervals), "busy_s": busy, "idle_s": idle, "span_s": cur_end - intervals[0][0],
            "gaps_over_0.5ms": sum(g > 5e-4 for g in gaps), "longest_gap_s": gaps[0] if gaps else 0.0,
            "gaps_over_1ms_per_layer": sum(g > 1e-3 for g in gaps) / max(layer_phases, 1),
            "top_gaps_s": gaps[:8]}


def _profile_step(step, device: str, layers: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
    per_stream: dict[str, list] = {}
    for e in prof.events():
        on_gpu = str(getattr(e, "device_type", "")).endswith("CUDA")
        if (device == "cuda") != on_gpu or (not on_gpu and e.cpu_parent is not None):
            continue                      # GPU: kernels; CPU: top-level ops (rule 1)
        key = str(e.device_resource_id if on_gpu else e.thread)
        per_stream.setdefault(key, []).append((e.time_range.start / 1e6, e.time_range.end / 1e6))
    if not per_stream:
        return {"error": "the profiler recorded no kernels"}
    compute = max(per_stream, key=lambda k: sum(b - a for a, b in per_stream[k]))
    return {"compute_stream": compute, "streams": len(per_stream),
            **stream_gaps(per_stream[compute], 2 * layers)}


def run_row(spec: dict) -> dict:
    """One (shape, seq, method) row; runs in its own process."""
    import torch
    import memo
    device, shape, seq, method = spec["device"], SHAPES[spec["shape"]], spec["seq"], spec["method"]
    kind, ratio, variant = parse_method(method)
    row = {"shape": spec["shape"], "seq": seq, "method": method}
    plan = None
    if variant == "planned":
        import tempfile
        from memo.planned_memory import install
        from transformers import LlamaConfig
        cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                          num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                          max_position_embeddings=max(seq, 4096), use_cache=False)
        plan = _make_plan(cfg, seq, ratio, spec["host_budget"], tempfile.mkdtemp(prefix="gpu_step-"))
        install()      # before the first CUDA allocation (NOTE [ Planned memory at run time ] rule 2)
        row["plan"] = plan
    model, cfg = _build(shape, seq, device)
    _prepare(model, method, spec["host_budget"], plan)
    counters = device == "cuda" and variant != "planned"   # torch.cuda's memory stats (not under memo's allocator)
    ids = torch.randint(0, shape["vocab"], (1, seq), device=device, generator=torch.Generator(device).manual_seed(1))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        _sync(device)
        return loss

    from memo.wrap import runtime_of   # (memo.wrap is also the function)

    def auto_settling() -> bool:
        if ratio != "auto":
            return False
        auto = runtime_of(model).auto
        return auto is None or not auto.settled

    times, peaks, reserved = [], [], []
    i = warm = 0
    while len(times) < spec["steps"]:
        # Warm-up: --warmup steps, and for memo-auto until it has settled (capped).
        warming = i < spec["warmup"] or (auto_settling() and i < spec["warmup"] + AUTO_MAX_EXTRA_WARMUP)
        model.zero_grad(set_to_none=True)
        _sync(device)
        if counters:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = step()
        elapsed = time.perf_counter() - start
        i += 1
        if warming:
            warm += 1
        else:
            times.append(elapsed)
            if counters:
                peaks.append(torch.cuda.max_memory_allocated())
                reserved.append(torch.cuda.max_memory_reserved())
        what = "warm-up" if warming else f"{len(times)}/{spec['steps']} timed"
        log(f"{PROGRESS}{spec['shape']} {seq} {method}: step {i} {elapsed:.3f} s ({what})")
    row["warmup_steps"] = warm
    from memo.planner.cost import model_flops_per_step
    from memo.profile import model_identity
    flops = model_flops_per_step(model_identity(cfg), seq, 1, 1)
    step_s = statistics.median(times)
    row.update(status="ok", step_s=step_s, step_times_s=times, loss=float(loss.detach()),
               peak_allocated_bytes=max(peaks) if peaks else None, peak_reserved_bytes=max(reserved) if reserved else None,
               model_flops=flops, mfu=flops / (step_s * spec["peak_tflops"] * 1e12) if spec["peak_tflops"] else None)
    if kind == "memo":
        st = memo.stats(model).to_dict()
        for key in ("swap_ratio", "swap_ratio_reason", "swap_ratio_decisions", "timing_source", "step", "copies",
                    "host_pool", "planned_memory"):
            row[key] = st.get(key)
        if variant == "planned":   # every device allocation went to the arena or its fallback pool
            pm = st["planned_memory"]
            row["peak_allocated_bytes"] = pm["peak_arena_bytes"] + pm["fallback_used_peak_bytes"]
            row["peak_reserved_bytes"] = pm["arena_bytes"] + pm["fallback_reserved_peak_bytes"]
        if not spec["no_profile"]:
            row["profile"] = _profile_step(step, device, shape["layers"])
    return row


def worker_main(spec_json: str) -> int:
    import torch
    spec = json.loads(spec_json)
    try:
        row = run_row(spec)
    except torch.OutOfMemoryError as e:
        row = {"shape": spec["shape"], "seq": spec["seq"], "method": spec["method"], "status": OOM,
               "error": str(e)[:300]}
    print("GPU_STEP_ROW " + json.dumps(row), flush=True)
    return 0


# --- the driver ---------------------------------------------------------------------------------

def run_in_subprocess(spec: dict, timeout: float) -> dict:
    env = dict(os.environ)
    alloc_conf = "expandable_segments:True" if parse_method(spec["method"])[2] == "expandable" else spec["alloc_conf"]
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf   # read once, when CUDA starts: hence a process
    base = {"shape": spec["shape"], "seq": spec["seq"], "method": spec["method"]}
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "error": f"no result within {timeout:.0f} s"}
    sys.stderr.write(proc.stderr if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith(PROGRESS)))
    rows = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("GPU_STEP_ROW ")]
    if proc.returncode or not rows:
        oom = "out of memory" in proc.stderr.lower()
        return {**base, "status": OOM if oom else "error", "error": proc.stderr.strip()[-1500:]}
    return json.loads(rows[-1])


def add_ratios(rows: list[dict]) -> None:
    """Step-time and peak ratios against none and hf-ckpt of the same shape and length."""
    ok = {(r["shape"], r["seq"], r["method"]): r for r in rows if r["status"] == "ok"}
    for r in rows:
        for base in ("none", "hf-ckpt"):
            b = ok.get((r["shape"], r["seq"], base))
            good = r["status"] == "ok" and b is not None
            r[f"time_vs_{base}"] = r["step_s"] / b["step_s"] if good else None
            r[f"peak_vs_{base}"] = (r["peak_allocated_bytes"] / b["peak_allocated_bytes"]
                                    if good and b["peak_allocated_bytes"] else None)


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"gpu_step: {meta['device_name']}, torch {meta['torch']}, batch 1, {meta['dtype']}, median of "
          f"{meta['steps']} steps after {meta['warmup']} warm-up (memo-auto: until settled); alloc conf "
          f"{meta['alloc_conf'] or 'default'}")
    print(f"{'shape':<10} {'tokens':>7} {'method':<16} {'step s':>8} {'vs none':>8} {'vs ckpt':>8} {'alloc GiB':>10} "
          f"{'resvd GiB':>10} {'MFU':>6} {'ratio':>6} {'idle s':>7} {'max gap ms':>10} {'>1ms/layer':>10}")
    for r in rows:
        head = f"{r['shape']:<10} {r['seq']:>7} {r['method']:<16}"
        if r["status"] != "ok":
            print(f"{head} {r['status']}")
            continue
        prof = r.get("profile") or {}
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        ratio = "-" if r.get("swap_ratio") is None else f"{r['swap_ratio']:.3g}"
        idle = "-" if "idle_s" not in prof else f"{prof['idle_s']:.3f}"
        gap = "-" if "longest_gap_s" not in prof else f"{1e3 * prof['longest_gap_s']:.2f}"
        per_layer = "-" if "gaps_over_1ms_per_layer" not in prof else f"{prof['gaps_over_1ms_per_layer']:.2f}"
        print(f"{head} {r['step_s']:>8.3f} {_x(r['time_vs_none']):>8} {_x(r['time_vs_hf-ckpt']):>8} "
              f"{_gib(r['peak_allocated_bytes']):>10} {_gib(r['peak_reserved_bytes']):>10} {mfu:>6} {ratio:>6} "
              f"{idle:>7} {gap:>10} {per_layer:>10}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 3-layer hidden-64 model at 256 tokens (tests, CPU)")
    p.add_argument("--quick", action="store_true", help="the issue's targets in ~6 minutes on an H100")
    p.add_argument("--fragmentation", action="store_true",
                   help="issue 10: memo-0 under the caching allocator, expandable segments and planned memory, "
                        "TinyLlama 128K and Llama-2-7B 64K")
    p.add_argument("--shapes", nargs="+", choices=[s for s in SHAPES if s != "tiny"], default=["tinyllama"])
    p.add_argument("--seq-lens", nargs="+", type=parse_tokens, default=[32768])
    p.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    p.add_argument("--methods", nargs="+", default=None, help="subset of the rows (default: all)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row, median (default 3; --quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--host-budget", default="64GiB", help="memo's host_memory_budget")
    p.add_argument("--alloc-conf", default="", help="PYTORCH_CUDA_ALLOC_CONF for every row, e.g. "
                                                    "expandable_segments:True")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: from the GPU)")
    p.add_argument("--no-profile", action="store_true", help="skip the profiled step of memo rows")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per row before it is recorded as timeout")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.steps is None:
        args.steps = 2 if args.quick or args.fragmentation else 3
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    names = method_names(args.ratios)
    if args.methods:
        unknown = sorted(set(args.methods) - set(names))
        if unknown:
            p.error(f"--methods: {unknown} are not rows; choose from {names}")
        names = [n for n in names if n in args.methods]

    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        log(f"gpu_step: no CUDA GPU here (torch {torch.__version__}, torch.cuda.is_available() is False): this "
            f"benchmark measures GPU step time and memory. Run it on a machine with a GPU, or use "
            f"--device cpu --tiny to check the code path")
        return 2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({platform.machine()})"
    peak_tflops = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)

    if args.tiny:
        plan = [("tiny", 256, [n for n in names if n != "hf-ckpt-offload" or args.device == "cuda"])]
    elif args.quick:
        plan = QUICK
    elif args.fragmentation:
        plan = FRAGMENTATION
    else:
        plan = [(s, n, names) for s in args.shapes for n in args.seq_lens]
    specs = [{"device": args.device, "shape": shape, "seq": seq, "method": m, "steps": args.steps,
              "warmup": args.warmup, "host_budget": args.host_budget, "alloc_conf": args.alloc_conf,
              "peak_tflops": peak_tflops, "no_profile": args.no_profile}
             for shape, seq, methods in plan for m in methods]
    rows, start = [], time.perf_counter()
    for k, spec in enumerate(specs):
        log(f"[{k + 1}/{len(specs)}] {spec['shape']} {spec['seq']} tokens, {spec['method']} "
            f"({time.perf_counter() - start:.0f} s so far)")
        rows.append(run_in_subprocess(spec, args.timeout))
        if rows[-1]["status"] != "ok":
            log(f"  -> {rows[-1]['status']}")
    add_ratios(rows)
    meta = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
            "dtype": "bf16" if args.device == "cuda" else "fp32", "steps": args.steps, "warmup": args.warmup,
            "peak_tflops": peak_tflops, "alloc_conf": args.alloc_conf, "host_budget": args.host_budget,
            "shapes": {s: SHAPES[s] for s in {r["shape"] for r in rows}}, "wall_s": time.perf_counter() - start}
    print_table(rows, meta)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"results": rows, "meta": meta}, f, indent=1)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
