"""``memo plan``: will this job fit, and how fast will it be? Answered from the real model layer.

    memo plan --model memo-paper-7b --seq-len 1M --gpus 8 --sp 8 --gpu a800 --host-memory 2TiB

Profiles one decoder layer under FakeTensorMode at the per-rank length, solves the Level-1 MIP
for its forward and backward, the alpha program, the Level-2 step layout and the step-time
model, then prints a memory table and predictions (``--json``: one object). Bad input or a job
that does not fit: a message on stderr naming the fix, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from memo.errors import MemoError
from memo.planner.cost import SP_BACKENDS, SPBackendError, UnknownGPU, get_gpu
from memo.planner.units import UnitError, format_bytes, parse_bandwidth, parse_bytes, parse_count


def plan_command_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict memory, swap ratio, step time and MFU of a long-context job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="preset (memo-paper-7b, llama3-8b, ...) or path to a config.json")
    p.add_argument("--seq-len", help="tokens per sequence: 1048576, 512K, 1M")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (default: all GPUs)")
    p.add_argument("--sp-backend", default="ring",
                   help="ring (zigzag ring attention, any head count; default), ulysses (all-to-all over heads: "
                        "heads and kv heads divisible by --sp) or hybrid (Ulysses inside a node, ring across nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing one host's memory (default 8)")
    p.add_argument("--gpu", default="a800", help="a800, a100-80g, h100, h200 (default a800)")
    p.add_argument("--host-memory", help="host memory per node memo may use: 2TiB, 512GiB")
    p.add_argument("--pcie", default=None, help="achieved host<->GPU bandwidth per GPU, e.g. 25GB/s (GPU default)")
    p.add_argument("--nvlink", default=None, help="GPU<->GPU bandwidth per direction, e.g. 200GB/s (GPU default)")
    p.add_argument("--inter-node", default=None,
                   help="GPU<->GPU bandwidth per GPU across nodes, per direction, e.g. 25GB/s (GPU default)")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--gpu-memory", default=None, help="override the GPU's memory, e.g. 80GiB")
    p.add_argument("--reserve", default="2GiB", help="device memory outside the plan: CUDA context, NCCL (2GiB)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype (bf16)")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=None,
                   help="ZeRO stage over all GPUs (default: the lowest that fits)")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer states on the host (CPU Adam)")
    p.add_argument("--swap-ratio", default="auto", help="alpha in [0, 1] or 'auto' (the alpha program)")
    p.add_argument("--keep-layers", type=int, default=2, help="last layers kept on the device (paper: 2)")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per chunk of the LM head + loss (4096)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for each MIP (default 60)")
    p.add_argument("--no-mip", action="store_true", help="greedy layouts only (no MIP)")
    p.add_argument("--max-seq-len", action="store_true", help="also search the largest sequence length that fits")
    p.add_argument("--out", default=None, help="write the plan (JSON) here, for MemoConfig(plan=...)")
    p.add_argument("--plot", default=None, help="write a PNG of the planned layouts here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--from-plan", default=None, metavar="PLAN_JSON",
                   help="check and show a plan written by --out instead of making one")
    p.set_defaults(func=plan_command)


class _Progress:
    """One status line on stderr while the MIPs run (rewritten in place on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, stage: str, elapsed: float, limit: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and now - self._last < 5.0:
            return
        self._last = now
        line = f"memo plan: solving {stage} MIP ... {elapsed:5.1f} s of at most {limit:.0f} s"
        sys.stderr.write(("\r" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def say(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(("\r\033[K" if self.tty else "") + f"memo plan: {text}\n")
            sys.stderr.flush()


def _parse(args):
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "seq_len", "host_memory") if getattr(args, n) is None]
    if missing:
        raise MemoError(f"memo.plan: {', '.join(missing)} required; e.g. memo plan --model memo-paper-7b --seq-len 1M "
                        f"--gpus 8 --gpu a800 --host-memory 2TiB")
    try:
        seq_len = parse_count(args.seq_len)
        host = parse_bytes(args.host_memory)
        reserve = parse_bytes(args.reserve)
        overrides = {"host_link_Bps": parse_bandwidth(args.pcie) if args.pcie else None,
                     "interconnect_Bps": parse_bandwidth(args.nvlink) if args.nvlink else None,
                     "inter_node_Bps": parse_bandwidth(args.inter_node) if args.inter_node else None,
                     "peak_tflops": args.peak_tflops,
                     "memory_bytes": parse_bytes(args.gpu_memory) if args.gpu_memory else None}
    except UnitError as e:
        raise MemoError(f"memo.plan: {e}") from e
    try:
        gpu = get_gpu(args.gpu, **overrides)
    except UnknownGPU as e:
        raise MemoError(f"memo.plan: {e}") from e
    sp = args.gpus if args.sp is None else args.sp
    if args.gpus < 1 or sp < 1 or args.gpus % sp:
        raise MemoError(f"memo.plan: --gpus {args.gpus} is not a multiple of --sp {sp}; the GPUs form gpus/sp "
                        f"data-parallel groups of sp ranks: choose --sp dividing --gpus")
    if args.micro_batch < 1:
        raise MemoError(f"memo.plan: --micro-batch {args.micro_batch} must be >= 1")
    if args.keep_layers < 0:
        raise MemoError(f"memo.plan: --keep-layers {args.keep_layers} must be >= 0")
    swap = args.swap_ratio
    if swap != "auto":
        try:
            swap = float(swap)
        except ValueError as e:
            raise MemoError(f"memo.plan: --swap-ratio {args.swap_ratio!r} is neither a number nor 'auto'; pass a "
                            f"fraction in [0, 1] or auto") from e
        if not 0.0 <= swap <= 1.0:
            raise MemoError(f"memo.plan: --swap-ratio {swap} is outside [0, 1]; pass a fraction in [0, 1] or auto")
    if args.offload_optimizer and args.zero_stage == 0:
        raise MemoError("memo.plan: --offload-optimizer needs ZeRO stage 1, 2 or 3; pass --zero-stage 1 or drop "
                        "--zero-stage to let memo choose")
    if args.sp_backend not in SP_BACKENDS:
        raise MemoError(f"memo.plan: --sp-backend {args.sp_backend!r} is not one of {', '.join(SP_BACKENDS)}; pass one "
                        f"of those (ring, the default, works for any head count)")
    if args.time_limit <= 0:
        raise MemoError(f"memo.plan: --time-limit {args.time_limit} must be positive seconds")
    return seq_len, host, reserve, gpu, sp, swap


def plan_command(args) -> int:
    try:
        return _plan(args)
    except MemoError as e:
        sys.stderr.write(f"{e}\n")
        return 2


def _plan(args) -> int:
    from memo.planner.plan import Cluster, Options, PlanContext, plan_for_stages, solve_level1
    from memo.planner.planfile import write_plan
    from memo.profile import check_seq_len, load_model, profile_model

    if args.from_plan:
        return _show_plan(args)
    seq_len, host, reserve, gpu, sp, swap = _parse(args)
    model = load_model(args.model)
    cluster = Cluster(gpus=args.gpus, sp=sp, gpu=gpu, host_memory=host, gpus_per_node=args.gpus_per_node,
                      reserve_bytes=reserve, sp_backend=args.sp_backend)
    try:
        degrees = cluster.sp_degrees(model)
    except SPBackendError as e:
        raise MemoError(str(e)) from e
    check_seq_len(seq_len, sp)
    progress = _Progress(enabled=True)
    options = Options(offload_optimizer=args.offload_optimizer, swap_ratio=swap, keep_layers=args.keep_layers,
                      time_limit=args.time_limit, use_mip=not args.no_mip)
    t0 = time.perf_counter()
    prof = profile_model(model, seq_len=seq_len, micro_batch=args.micro_batch, dtype=args.dtype, sp=sp,
                         loss_chunk=args.loss_chunk).to_dict()
    progress.say(f"profiled one {model['model_type']} layer at {prof['local_seq_len']:,} tokens per rank in "
                 f"{time.perf_counter() - t0:.2f} s ({len(prof['forward']['allocs'])} forward, "
                 f"{len(prof['backward']['allocs'])} backward allocations)")
    level1 = solve_level1(prof, degrees=degrees, time_limit=args.time_limit, use_mip=not args.no_mip,
                          progress=progress)
    progress.say(f"Level 1 solved: forward {level1.forward.status}; backward {level1.backward.status}")
    ctx = PlanContext(prof, cluster, options, level1, model_name=model.get("name", ""))
    plan, tried = plan_for_stages(ctx, args.zero_stage)
    plan["stages_tried"] = [{"zero_stage": p["zero_stage"], "fits": p["fits"],
                             "device_peak_bytes": p["predicted"]["device_peak_bytes"], "reasons": p["reasons"]}
                            for p in tried]
    if args.zero_stage is None:
        before = "; ".join(f"stage {p['zero_stage']} needs {format_bytes(p['predicted']['device_peak_bytes'])}"
                           for p in tried[:-1])
        progress.say("--zero-stage not given: " + (f"chose ZeRO stage {plan['zero_stage']}, the lowest that fits"
                                                    if plan["fits"] else "no ZeRO stage fits")
                     + (f" ({before} per GPU)" if before else ""))

    def fits_at(s: int, *, gpus: int = args.gpus, sp_: int = sp, host_: int = host,
                stage=args.zero_stage, offload: bool = args.offload_optimizer, swap_=swap) -> bool:
        """Does the job fit with these changes? Greedy layouts; higher ZeRO stages only lower
        device memory, so with no stage given "some stage fits" is "stage 3 fits"."""
        from memo.planner.plan import finish_plan
        cl = Cluster(gpus=gpus, sp=sp_, gpu=gpu, host_memory=host_, gpus_per_node=args.gpus_per_node,
                     reserve_bytes=reserve, sp_backend=args.sp_backend)
        try:
            deg = cl.sp_degrees(model)
        except SPBackendError:
            return False                    # e.g. more GPUs than the heads allow Ulysses to split over
        pr = profile_model(model, seq_len=s, micro_batch=args.micro_batch, dtype=args.dtype, sp=sp_,
                           loss_chunk=args.loss_chunk).to_dict()
        opts = Options(offload_optimizer=offload, swap_ratio=swap_, keep_layers=args.keep_layers, use_mip=False)
        c = PlanContext(pr, cl, opts, solve_level1(pr, degrees=deg, use_mip=False))
        return finish_plan(c, 3 if stage is None else stage)["fits"]

    granularity = 2 * sp * -(-8192 // (2 * sp))
    if args.max_seq_len or not plan["fits"]:
        from memo.planner.plan import max_fitting_seq_len
        progress.say("searching the largest sequence length that fits (greedy layouts)")
        plan["max_seq_len"] = max_fitting_seq_len(fits_at, start=seq_len, granularity=granularity)
    if not plan["fits"]:
        plan["suggestions"] = _suggestions(plan, fits_at, seq_len, args, sp, host, swap)

    _emit(plan, args)
    if args.plot:
        progress.say(f"wrote {args.plot}")
    if not plan["fits"]:
        fixes = "; ".join(plan["suggestions"]) or ("no single change found (tried ZeRO stages, offload, the swap "
                                                    "ratio, 64 TiB of host memory, 64x the GPUs)")
        sys.stderr.write(f"memo.plan: the job does not fit: {'; '.join(plan['reasons'])}. Smallest changes that fit: "
                         f"{fixes}\n")
        if args.out:
            sys.stderr.write(f"memo.plan: not writing {args.out}: a plan that does not fit would fail at run time\n")
        return 2
    if args.out:
        _write(args.out, "plan", lambda: write_plan(args.out, plan))
        progress.say(f"wrote {args.out} (use it with memo.MemoConfig(plan={args.out!r}))")
    return 0


def _show_plan(args) -> int:
    from memo.planner.planfile import PlanFileError, load_plan
    try:
        plan = load_plan(args.from_plan)
    except PlanFileError as e:
        raise MemoError(str(e)) from e
    _emit(plan, args)
    return 0


def _emit(plan: dict, args) -> None:
    """The plan as JSON (``--json``) or the human report, and its plot (``--plot``)."""
    if args.json:
        print(json.dumps(plan, indent=1, sort_keys=True))
    else:
        _report(plan)
    if args.plot:
        _write(args.plot, "plot", lambda: _plot(plan, args.plot))


def _plot(plan: dict, path: str) -> None:
    from memo.planner.plot import plot_plan
    plot_plan(plan, path)


def _write(path: str, what: str, fn) -> None:
    try:
        fn()
    except OSError as e:
        raise MemoError(f"memo.plan: cannot write the {what} to {path!r} ({e.strerror}); pass a path in an existing, "
                        f"writable directory") from e


def _suggestions(plan: dict, fits_at, seq_len: int, args, sp: int, host: int, swap) -> list[str]:
    """The smallest single changes that make the job fit, each checked with ``fits_at``: a ZeRO
    stage, optimizer offload, the swap ratio, more host memory, more GPUs (SP grown with them,
    the data-parallel degree kept), a shorter sequence."""
    out = []
    if args.zero_stage is not None and args.zero_stage < 3 and fits_at(seq_len, stage=None):
        out.append("drop --zero-stage (a higher stage fits)")
    if not args.offload_optimizer and fits_at(seq_len, offload=True,
                                              stage=None if args.zero_stage in (None, 0) else args.zero_stage):
        out.append("--offload-optimizer")
    if swap != "auto" and any(r.startswith("host") for r in plan["reasons"]) and fits_at(seq_len, swap_="auto"):
        out.append("--swap-ratio auto (the largest ratio the host memory holds)")
    if any(r.startswith("host") for r in plan["reasons"]):
        mib = 1 << 20
        limit = 64 << 40
        if fits_at(seq_len, host_=limit):
            lo, hi = host // mib, limit // mib        # search in MiB: fits at hi, not at lo
            while hi - lo > max(1, hi // 100):        # to 1%
                mid = (lo + hi) // 2
                if fits_at(seq_len, host_=mid * mib):
                    hi = mid
                else:
                    lo = mid
            out.append(f"--host-memory {format_bytes(hi * mib)} per node")
    for factor in (2, 4, 8, 16, 32, 64):
        g, s = args.gpus * factor, sp * factor
        if seq_len % (2 * s):
            break
        if fits_at(seq_len, gpus=g, sp_=s):
            out.append(f"--gpus {g} --sp {s}")
            break
    if plan.get("max_seq_len"):
        out.append(f"--seq-len {plan['max_seq_len']} (the largest that fits this cluster)")
    return out


def _report(plan: dict) -> None:
    from memo.planner.plan import memory_rows
    m, pr, gpu = plan["model"], plan["predicted"], plan["gpu"]
    fb = format_bytes
    print(f"memo plan: {plan.get('model_name') or m['model_type']} ({m['model_type']}, {m['layers']} layers, hidden "
          f"{m['hidden']}, {m['heads']} heads / {m['kv_heads']} kv), {plan['seq_len']:,} tokens x "
          f"{plan['micro_batch']} micro-batch, {plan['dtype']}")
    print(f"cluster:   {plan['gpus']} x {gpu['name']} ({fb(gpu['memory_bytes'])}, {gpu['peak_tflops']:.0f} TFLOP/s, "
          f"host link {gpu['host_link_Bps'] / 1e9:.0f} GB/s), SP {plan['sp']} {_sp_backend(plan)} "
          f"({plan['local_seq_len']:,} tokens per rank), host {fb(plan['host_memory_bytes'])} per node of "
          f"{plan['gpus_per_node']} GPUs")
    chosen = " (chosen: the lowest stage that fits)" if plan.get("zero_stage_chosen") and plan["fits"] else ""
    if plan.get("zero_stage_chosen") and not plan["fits"]:
        chosen = " (no stage fits; showing the highest)"
    print(f"ZeRO:      stage {plan['zero_stage']}{chosen}"
          f"{', optimizer offloaded to the host' if plan['offload_optimizer'] else ''}")
    for t in plan.get("stages_tried", [])[:-1]:
        print(f"           stage {t['zero_stage']} would need {fb(t['device_peak_bytes'])} per GPU")
    print()
    print(f"  {'memory per GPU':<44}{'bytes':>12}  live at peak")
    for name, nbytes, live in memory_rows(plan):
        print(f"  {name:<44}{fb(nbytes):>12}  {'yes' if live else ''}")
    print(f"  {'planned step peak (Level 2)':<44}{fb(plan['step']['peak_bytes']):>12}  at "
          f"{plan['step']['step_labels'][plan['step']['peak_step']]}")
    print(f"  {'device peak (step + reserve)':<44}{fb(pr['device_peak_bytes']):>12}  of {fb(gpu['memory_bytes'])}")
    print(f"  {'host, per node':<44}{fb(pr['host_bytes']):>12}  of {fb(plan['host_memory_bytes'])}")
    print()
    print(f"  {'layout':<18}{'peak':>12}{'lower bound':>14}{'gap':>8}{'greedy':>12}{'MIP gap':>9}{'solve':>8}")
    for name, lay in (("layer forward", plan["layer"]["forward"]), ("layer backward", plan["layer"]["backward"]),
                      ("step (Level 2)", plan["step"])):
        mg = "-" if lay["mip_gap"] is None else f"{lay['mip_gap']:.2%}"
        print(f"  {name:<18}{fb(lay['peak_bytes']):>12}{fb(lay['lower_bound_bytes']):>14}{lay['gap']:>8.2%}"
              f"{fb(lay['greedy_peak_bytes']):>12}{mg:>9}{lay['solve_s']:>7.1f}s")
    sw, ad, t = plan["swap"], plan["alpha_detail"], pr["times"]
    print()
    print(f"alpha:     {plan['alpha']:.3f}  ({ad['reason']}; copy-time bound {ad['time_bound']:.3f}, host bound "
          f"{ad['memory_bound']:.3f})")
    print(f"           per layer: swap {fb(sw['swapped_bytes_per_layer'])} (input {fb(sw['layer_input_bytes'])}, "
          f"attention {fb(sw['attention_output_bytes'])}, {plan['alpha']:.3f} of {fb(sw['other_bytes'])} other), "
          f"recompute {fb(sw['recomputed_bytes_per_layer'])}; {sw['swapped_layers']} layers swapped")
    exposed = "hidden" if t["copy_exposed_s"] == 0 else f"{t['copy_exposed_s']:.1f} s exposed per step"
    print(f"predicted: step {pr['step_time_s']:.1f} s, MFU {pr['mfu']:.1%}; per layer forward "
          f"{t['layer_forward_s']:.2f} s, backward {t['layer_backward_s']:.2f} s, recompute {t['layer_recompute_s']:.2f} s; copy "
          f"{t['copy_out_s']:.2f} s each way ({exposed})")
    print(_sp_comm_line(plan))
    if plan.get("max_seq_len") is not None:
        stage = "the same ZeRO stage" if not plan.get("zero_stage_chosen") else "any ZeRO stage"
        print(f"max length: {plan['max_seq_len']:,} tokens fit on this cluster (greedy layouts, {stage}, same options)")
    print(f"fits:      {'yes' if plan['fits'] else 'NO: ' + '; '.join(plan['reasons'])}")


def _sp_backend(plan: dict) -> str:
    """The SP backend, with its split for hybrid; plans older than the field ran the ring."""
    backend = plan.get("sp_backend", "ring")
    deg = plan.get("sp_degrees", {"ulysses": 1, "ring": plan["sp"]})
    if backend == "hybrid":
        return f"hybrid = Ulysses {deg['ulysses']} in a node x ring {deg['ring']} across nodes"
    return backend


def _sp_comm_line(plan: dict) -> str:
    """Predicted SP communication per layer: exposed (what compute does not hide), then what is sent."""
    t = plan["predicted"]["times"]
    c = plan["predicted"].get("sp_comm")
    fwd = t.get("sp_comm_fwd_s", t["ring_exposed_fwd_s"])
    bwd = t.get("sp_comm_bwd_s", t["ring_exposed_bwd_s"])
    head = (f"SP comm:   {plan.get('sp_backend', 'ring')}, exposed per layer: forward {_secs(fwd)}, "
            f"backward {_secs(bwd)}")
    if plan["sp"] == 1:
        return head + " (no sequence parallelism)"
    if c is None:
        return head
    parts = []
    if c["ring_degree"] > 1:
        parts.append(f"ring of {c['ring_degree']}: {format_bytes(c['ring_fwd_bytes'])} / "
                     f"{format_bytes(c['ring_bwd_bytes'])} in {_secs(c['ring_fwd_transfer_s'])} / "
                     f"{_secs(c['ring_bwd_transfer_s'])}, overlapped with attention")
    if c["ulysses_degree"] > 1:
        parts.append(f"all-to-all over {c['ulysses_degree']}: {format_bytes(c['a2a_fwd_bytes'])} / "
                     f"{format_bytes(c['a2a_bwd_bytes'])} in {_secs(c['a2a_fwd_s'])} / {_secs(c['a2a_bwd_s'])}, "
                     f"not overlapped")
    return head + "\n           sent per layer, forward / backward: " + "; ".join(parts)


def _secs(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"
