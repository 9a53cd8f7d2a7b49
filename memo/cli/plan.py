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
from typing import Optional

from memo.cli import emit_config
from memo.errors import MemoError
from memo.planner.cost import SP_BACKENDS, SPBackendError, UnknownGPU, get_gpu
from memo.planner.units import UnitError, format_bytes, parse_bandwidth, parse_bytes, parse_count


REQUIRED = ("model", "seq_len", "host_memory")


def plan_command_parser(subparsers) -> None:
    p = subparsers.add_parser("plan", help="predict memory, swap ratio, step time and MFU of a long-context job",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    req = p.add_argument_group("required (unless --from-plan)")
    req.add_argument("--model", help="preset (memo-paper-7b, llama3-8b, ...) or path to a config.json")
    req.add_argument("--seq-len", help="tokens per sequence: 1048576, 512K, 1M")
    req.add_argument("--host-memory", help="host memory per node memo may use: 2TiB, 512GiB")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch (default 1)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the job (default 8)")
    p.add_argument("--sp", type=int, default=None, help="sequence-parallel degree (default: all GPUs)")
    p.add_argument("--sp-backend", default="ring",
                   help="ring (zigzag ring attention, any head count; default), ulysses (all-to-all over heads: "
                        "heads and kv heads divisible by --sp) or hybrid (Ulysses inside a node, ring across nodes)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs sharing one host's memory (default 8)")
    p.add_argument("--gpu", default="a800", help="a800, a100-80g, h100, h200 (default a800)")
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
    p.add_argument("--offload-params", action="store_true",
                   help="weights on the host too, each layer's gathered to the GPU before its forward and backward "
                        "(DeepSpeed ZeRO-3 offload_param; needs --offload-optimizer, ZeRO stage 3)")
    p.add_argument("--swap-ratio", default="auto", help="alpha of the 'memo' layers in [0, 1] or 'auto' (the "
                                                        "alpha program)")
    p.add_argument("--keep-layers", type=int, default=None,
                   help="last layers kept on the device (default: the planner chooses 0..4 with the layer "
                        "policies, 0 when memory-bound; with a given --swap-ratio, MemoConfig's default 2)")
    p.add_argument("--policy", default=None, choices=["auto", "memo", "input"],
                   help="layer policy of the swapped layers: auto (the planner mixes 'memo' and 'input' layers; "
                        "the default with --swap-ratio auto), memo (input + attention output + alpha of the rest on "
                        "the host; the default with a given --swap-ratio, as the runtime runs a fixed ratio without "
                        "a plan) or input (only the input on the host, attention recomputed)")
    p.add_argument("--tile-tokens", default="auto",
                   help="MLP token tile, as MemoConfig.tile_tokens: auto (default: the runtime's rule), none "
                        "(untiled) or a token count")
    p.add_argument("--loss-chunk", type=int, default=4096, help="tokens per chunk of the LM head + loss (4096)")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds for each MIP (default 60)")
    p.add_argument("--no-mip", action="store_true", help="greedy layouts only (no MIP)")
    p.add_argument("--max-seq-len", action="store_true",
                   help="also search the largest sequence length that fits, over ZeRO stages, optimizer and "
                        "parameter offload and the layer policies, and say what limits it")
    p.add_argument("--out", default=None, help="write the plan (JSON) here, for MemoConfig(plan=...)")
    p.add_argument("--emit-config", default=None, metavar="RUN_YAML",
                   help="also write the Accelerate config with memo's section that runs the plan: memo launch "
                        "--config_file RUN_YAML train.py (needs --out; NOTE [ Plan to launch ] in memo/cli/emit_config.py)")
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
    missing = [f"--{n.replace('_', '-')}" for n in REQUIRED if getattr(args, n) is None]
    if missing:
        raise MemoError(f"memo.plan: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required (--model, "
                        f"--seq-len and --host-memory always are); e.g. memo plan --model llama3-8b --seq-len 1M "
                        f"--gpus 8 --gpu h100 --host-memory 2TiB")
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
    _check_numbers(args, seq_len=seq_len, host=host, reserve=reserve, overrides=overrides)
    try:
        gpu = get_gpu(args.gpu, **overrides)
    except UnknownGPU as e:
        raise MemoError(f"memo.plan: {e}") from e
    sp = args.gpus if args.sp is None else args.sp
    if args.gpus < 1 or sp < 1 or args.gpus % sp:
        raise MemoError(f"memo.plan: --gpus {args.gpus} is not a multiple of --sp {sp}; the GPUs form gpus/sp "
                        f"data-parallel groups of sp ranks: choose --sp dividing --gpus")
    args.tile = _tile(args.tile_tokens)
    if args.swap_ratio != "auto":
        # A given ratio describes a run without a plan: the runtime runs "memo" on every swapped layer
        # (NOTE [ Layer policies ] rule 2 in memo/executor.py) and keeps its default last layers.
        from memo.config import MemoConfig
        args.policy = "memo" if args.policy is None else args.policy
        args.keep_layers = MemoConfig.keep_last_layers if args.keep_layers is None else args.keep_layers
    args.policy = args.policy or "auto"
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
    if args.offload_params and (not args.offload_optimizer or args.zero_stage not in (None, 3)):
        # NOTE [ Parameter offload ] rule 3 in planner/cost.py.
        raise MemoError(f"memo.plan: --offload-params needs --offload-optimizer and ZeRO stage 3 (only stage 3 "
                        f"partitions the weights; their gradients go to the host for CPU Adam); add "
                        f"{'--offload-optimizer' if not args.offload_optimizer else ''}"
                        f"{' and ' if not args.offload_optimizer and args.zero_stage not in (None, 3) else ''}"
                        f"{'--zero-stage 3 (or drop --zero-stage)' if args.zero_stage not in (None, 3) else ''}")
    if args.sp_backend not in SP_BACKENDS:
        raise MemoError(f"memo.plan: --sp-backend {args.sp_backend!r} is not one of {', '.join(SP_BACKENDS)}; pass one "
                        f"of those (ring, the default, works for any head count)")
    return seq_len, host, reserve, gpu, sp, swap


# NOTE [ Bounded plan flags ]
#
# 1. Every numeric flag is checked before the model is loaded: counts and sizes positive (--reserve
#    and --keep-layers may be 0), floats finite (nan compares false with every bound and once
#    printed "fits: yes"; a zero bandwidth or GPU count divided by zero deep in the cost model).
# 2. Counts that the planner's work grows with have upper bounds far above any machine room:
#    --gpus, --gpus-per-node, --micro-batch and --loss-chunk at most MAX_COUNT, --time-limit at most
#    MAX_TIME_LIMIT_S, the tokens per rank by rule 3. The model's own numbers: NOTE [ Bounded model
#    sizes ] in planner/presets.py.
# 3. The profile runs one decoder layer's MLP tile by tile, so its time grows with the tiles per rank
#    (4M tokens per rank, 512 tiles: 60 s; 16M, 2048 tiles: 4.3 min). A rank holds at most
#    MAX_LOCAL_TOKENS tokens (8M: one 7B layer input alone is then 64 GiB, beyond any GPU) in at
#    most MAX_TILES MLP tiles (auto's tiles are at least 4096 tokens: 2048 at 8M), and the
#    --max-seq-len search stays within both.
MAX_COUNT = 1 << 20
MAX_LOCAL_TOKENS = 1 << 23
MAX_TILES = 2048
MAX_TIME_LIMIT_S = 24 * 3600.0


def _longest_local(args) -> int:
    """The most tokens per rank NOTE [ Bounded plan flags ] rule 3 allows with this --tile-tokens."""
    tile = args.tile if isinstance(args.tile, int) else None
    return MAX_LOCAL_TOKENS if tile is None else min(MAX_LOCAL_TOKENS, MAX_TILES * tile)


def _check_work(args, model: dict, seq_len: int, sp: int) -> None:
    """NOTE [ Bounded plan flags ] rule 3, once the model (and so auto's tile) is known."""
    import math

    from memo.tiling import resolve_tile
    local = seq_len // sp
    if local > MAX_LOCAL_TOKENS:
        raise MemoError(f"memo.plan: --seq-len {seq_len:,} over --sp {sp} is {local:,} tokens per rank; memo plan "
                        f"plans at most {MAX_LOCAL_TOKENS:,} (8M) per rank: use a larger --sp (and --gpus) or a "
                        f"shorter --seq-len")
    itemsize = {"fp32": 4}.get(args.dtype, 2)
    tile = resolve_tile(args.tile, batch=args.micro_batch, seq=local, hidden=model["hidden"],
                        intermediate=model["intermediate"], itemsize=itemsize)
    if tile is not None and math.ceil(local / tile) > MAX_TILES:
        raise MemoError(f"memo.plan: --tile-tokens {args.tile_tokens} splits each rank's {local:,} tokens into "
                        f"{math.ceil(local / tile):,} MLP tiles; memo plan profiles at most {MAX_TILES:,}: pass "
                        f"--tile-tokens {math.ceil(local / MAX_TILES):,} or more, or none")


def _check_numbers(args, *, seq_len: int, host: int, reserve: int, overrides: dict) -> None:
    """NOTE [ Bounded plan flags ]: MemoError naming the flag, its value and what it must be."""
    import math

    def bad(flag, value, must):
        raise MemoError(f"memo.plan: {flag} {value} must be {must}")

    for flag, value in (("--gpus", args.gpus), ("--gpus-per-node", args.gpus_per_node),
                        ("--micro-batch", args.micro_batch), ("--loss-chunk", args.loss_chunk)):
        if not 1 <= value <= MAX_COUNT:
            bad(flag, value, f"an integer from 1 to {MAX_COUNT:,}")
    if args.sp is not None and not 1 <= args.sp <= args.gpus:
        bad("--sp", args.sp, f"an integer from 1 to --gpus ({args.gpus})")
    if seq_len < 1:
        bad("--seq-len", args.seq_len, "a positive number of tokens, e.g. 1M")
    if host <= 0:
        bad("--host-memory", args.host_memory, "positive, e.g. 512GiB")
    if reserve < 0:
        bad("--reserve", args.reserve, "0 or more, e.g. 2GiB")
    for flag, key, example in (("--pcie", "host_link_Bps", "25GB/s"), ("--nvlink", "interconnect_Bps", "200GB/s"),
                               ("--inter-node", "inter_node_Bps", "25GB/s"), ("--peak-tflops", "peak_tflops", "989"),
                               ("--gpu-memory", "memory_bytes", "80GiB")):
        value = overrides.get(key)
        if value is not None and not (math.isfinite(value) and value > 0):
            given = getattr(args, flag[2:].replace("-", "_"))
            bad(flag, given, f"a positive finite number, e.g. {example} (or left out: the GPU's default)")
    if not (math.isfinite(args.time_limit) and 0 < args.time_limit <= MAX_TIME_LIMIT_S):
        bad("--time-limit", args.time_limit, f"positive seconds, at most {MAX_TIME_LIMIT_S:.0f}")
    if args.keep_layers is not None and args.keep_layers < 0:
        bad("--keep-layers", args.keep_layers, ">= 0 (or left out: the planner chooses)")


def _tile(value: str):
    """--tile-tokens: "auto", "none" or a positive count, as MemoConfig.tile_tokens (None, "auto", int)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("none", "0", "off"):
        return None
    try:
        tile = parse_count(text)
    except UnitError as e:
        raise MemoError(f"memo.plan: --tile-tokens {value!r} is not auto, none or a token count; pass one of "
                        f"those") from e
    if tile <= 0:
        raise MemoError(f"memo.plan: --tile-tokens {value!r} must be positive (or none, or auto)")
    return tile


def plan_command(args) -> int:
    try:
        return _plan(args)
    except MemoError as e:
        sys.stderr.write(f"{e}\n")
        return 2


class _Planner:
    """Profiles and Level-1 layouts by (length, SP degree), made once each; quick plans (greedy
    layouts, policies chosen on the Level-2 bound) for the searches."""

    def __init__(self, args, model: dict, gpu, reserve: int, progress: "_Progress"):
        self.args, self.model, self.gpu, self.reserve, self.progress = args, model, gpu, reserve, progress
        self._cache: dict = {}
        self.profiles = 0

    def cluster(self, *, gpus: int, sp: int, host: int):
        from memo.planner.plan import Cluster
        return Cluster(gpus=gpus, sp=sp, gpu=self.gpu, host_memory=host, gpus_per_node=self.args.gpus_per_node,
                       reserve_bytes=self.reserve, sp_backend=self.args.sp_backend)

    def level1(self, seq_len: int, sp: int, degrees):
        """(profile dict, greedy Level 1) at this length and SP degree, cached."""
        from memo.planner.plan import solve_level1
        from memo.profile import profile_model
        key = (seq_len, sp, degrees)
        if key not in self._cache:
            a = self.args
            prof = profile_model(self.model, seq_len=seq_len, micro_batch=a.micro_batch, dtype=a.dtype, sp=sp,
                                 loss_chunk=a.loss_chunk, tile_tokens=a.tile).to_dict()
            self.profiles += 1
            self._cache[key] = (prof, solve_level1(prof, degrees=degrees, use_mip=False))
        return self._cache[key]

    def quick(self, seq_len: int, *, gpus: int, sp: int, host: int, stage: Optional[int], offload: bool,
              swap, params: bool = False) -> Optional[dict]:
        """The plan with greedy layouts (no MIP) at the lowest ZeRO stage that fits, or None when the
        SP backend cannot split this model over ``sp`` ranks."""
        from memo.planner.plan import Options, PlanContext, plan_for_stages
        cl = self.cluster(gpus=gpus, sp=sp, host=host)
        try:
            deg = cl.sp_degrees(self.model)
        except SPBackendError:
            return None                    # e.g. more GPUs than the heads allow Ulysses to split over
        prof, l1 = self.level1(seq_len, sp, deg)
        opts = Options(offload_optimizer=offload, swap_ratio=swap, keep_layers=self.args.keep_layers, use_mip=False,
                       policy=self.args.policy, offload_params=params)
        plan, _ = plan_for_stages(PlanContext(prof, cl, opts, l1), stage)
        return plan

    def fits(self, seq_len: int, **kw) -> bool:
        plan = self.quick(seq_len, **kw)
        return plan is not None and plan["fits"]


def _plan(args) -> int:
    from memo.planner.plan import Options, PlanContext, plan_for_stages, solve_level1
    from memo.planner.planfile import write_plan
    from memo.profile import check_seq_len, load_model

    if args.from_plan:
        return _show_plan(args)
    t_start = time.perf_counter()
    seq_len, host, reserve, gpu, sp, swap = _parse(args)
    emit_config.check_args(args, sp)
    model = load_model(args.model)
    progress = _Progress(enabled=True)
    planner = _Planner(args, model, gpu, reserve, progress)
    cluster = planner.cluster(gpus=args.gpus, sp=sp, host=host)
    try:
        degrees = cluster.sp_degrees(model)
    except SPBackendError as e:
        raise MemoError(str(e)) from e
    check_seq_len(seq_len, sp)
    _check_work(args, model, seq_len, sp)
    t0 = time.perf_counter()
    prof, greedy_l1 = planner.level1(seq_len, sp, degrees)
    tile = f", MLP tile {prof['tile_tokens']:,} tokens" if prof.get("tile_tokens") else ", MLP untiled"
    progress.say(f"profiled one {model['model_type']} layer at {prof['local_seq_len']:,} tokens per rank{tile} in "
                 f"{time.perf_counter() - t0:.2f} s ({len(prof['forward']['allocs'])} forward, "
                 f"{len(prof['backward']['allocs'])} backward allocations)")

    def options(use_mip: bool) -> Options:
        return Options(offload_optimizer=args.offload_optimizer, offload_params=args.offload_params, swap_ratio=swap,
                       keep_layers=args.keep_layers,
                       time_limit=args.time_limit, use_mip=use_mip, policy=args.policy)

    # Greedy layouts first: the MIP runs only where it can change the answer (NOTE [ MIP plan is exact ]
    # rule 2: it can only lower a greedy peak, never below the lower bound the policy choice already uses).
    plan, tried = emit_config.plan_for_launch(   # the stages the launch config can run: NOTE [ Plan to launch ]
        plan_for_stages, PlanContext(prof, cluster, options(False), greedy_l1, model.get("name", "")), args, sp)
    mip_note = "not asked (--no-mip)" if args.no_mip else ""
    if not args.no_mip:
        l1_gap = greedy_l1.forward.peak > greedy_l1.forward.lower_bound or \
            greedy_l1.backward.peak > greedy_l1.backward.lower_bound
        could_fit = plan["fits"] or l1_gap or any(p["policy_search"]["fitting"] for p in tried)
        if not could_fit:
            mip_note = ("skipped: the job does not fit even at the layouts' lower bounds, which no layout goes "
                        "below")
        else:
            level1 = solve_level1(prof, degrees=degrees, time_limit=args.time_limit, use_mip=True,
                                  progress=progress) if l1_gap else greedy_l1
            progress.say(f"Level 1 solved: forward {level1.forward.status}; backward {level1.backward.status}")
            plan, tried = emit_config.plan_for_launch(
                plan_for_stages, PlanContext(prof, cluster, options(True), level1, model.get("name", "")), args, sp)
            mip_note = "run" if l1_gap else "Level 1 not needed (greedy layouts at their lower bounds)"
    plan["mip"] = mip_note
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
                stage=args.zero_stage, offload: bool = args.offload_optimizer, swap_=swap,
                params: bool = args.offload_params) -> bool:
        """Does the job fit with these changes? Greedy layouts, the policies chosen again."""
        return planner.fits(s, gpus=gpus, sp=sp_, host=host_, stage=stage, offload=offload, swap=swap_,
                            params=params)

    granularity = 2 * sp * -(-8192 // (2 * sp))
    if args.max_seq_len or not plan["fits"]:
        progress.say("searching the largest sequence length that fits (greedy layouts; ZeRO stages, optimizer "
                     "and parameter offload, layer policies)")
        plan["max_seq_len_search"] = _max_length(planner, plan, seq_len=seq_len, sp=sp, host=host, swap=swap,
                                                 granularity=granularity)
        plan["max_seq_len"] = plan["max_seq_len_search"]["max_seq_len"]
    if not plan["fits"]:
        plan["suggestions"] = _suggestions(plan, fits_at, seq_len, args, sp, host, swap)
    plan["planning_s"] = time.perf_counter() - t_start

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
    if args.emit_config:
        config = emit_config.write(args.emit_config, plan, args.out)
        progress.say(f"wrote {args.emit_config} ({config['distributed_type']}; run it with memo launch --config_file "
                     f"{args.emit_config} train.py)")
    return 0


def _max_length(planner: _Planner, plan: dict, *, seq_len: int, sp: int, host: int, swap, granularity: int) -> dict:
    """The largest length that fits on this cluster with any ZeRO stage (or the one given), with or
    without optimizer offload (then with the parameters offloaded too, at ZeRO stage 3), and the
    layer policies chosen at each length; the options used
    there and what limits the next length. Bounded: no length beyond what the host holds with
    every layer keeping only its input."""
    from memo.planner.policies import MAX_KEEP
    from memo.planner.search import max_fitting_seq_len_interp, what_limits
    args = planner.args
    stage = args.zero_stage
    # (optimizer, parameters) offloaded, in the order tried: each costs host memory and time (parameter
    # offload: NOTE [ Step-time model ] rule 9 in planner/cost.py), and only ZeRO-3 offloads parameters.
    offloads = [(False, False)] if stage == 0 else [(False, False), (True, False)]
    if stage in (None, 3):
        offloads.append((True, True))
    best: dict = {}

    def loosest(off: bool, params: bool) -> Optional[int]:
        """The ZeRO stage with the least device memory: 3 over several ranks; over one rank sharding
        saves nothing and stage 3 adds a gather buffer (the least stage offload allows), unless the
        parameters are offloaded (stage 3 only)."""
        if stage is not None:
            return stage
        return 3 if args.gpus > 1 or params else (1 if off else 0)

    def at(s: int) -> Optional[dict]:
        """The fitting plan at ``s`` (no offload first: it costs host memory and optimizer time)."""
        last = None
        for off, params in offloads:
            p = planner.quick(s, gpus=args.gpus, sp=sp, host=host, stage=loosest(off, params), offload=off, swap=swap,
                              params=params)
            if p is None:
                return None
            last = p
            if p["fits"]:
                return p
        best.setdefault("fail", {})[s] = last
        return None

    def evaluate(s: int) -> tuple[bool, float]:
        """(fits, how far from fitting): the larger of the device's and the host's excess, relative."""
        p = at(s)
        if p is not None:
            best.setdefault("ok", {})[s] = p
            q = p
        else:
            q = best.get("fail", {}).get(s)
            if q is None:
                return False, 1.0
        ps = q["policy_search"]
        dev = ps["least_device_bound_bytes"] / q["gpu"]["memory_bytes"] - 1.0
        budget = q["host_memory_bytes"] / q["gpus_per_node"]
        host = ps["least_host_bytes_per_rank"] / budget - 1.0
        return p is not None, max(dev, host)

    # Host bound: every layer keeping only its input (NOTE [ Policy choice ] rule 7) must fit.
    m = plan["model"]
    on_host = m["layers"] - min(MAX_KEEP if args.keep_layers is None else args.keep_layers, m["layers"])
    per_token = max(on_host, 1) * m["hidden"] * {"fp32": 4}.get(plan["dtype"], 2) * plan["micro_batch"]
    upper = max(granularity, int(host / plan["gpus_per_node"] / per_token * sp) // granularity * granularity)
    upper = min(upper, _longest_local(args) * sp // granularity * granularity)   # NOTE [ Bounded plan flags ] 3
    t0 = time.perf_counter()
    found = max_fitting_seq_len_interp(evaluate, start=min(seq_len, upper), granularity=granularity, upper=upper)
    out = {"max_seq_len": found, "granularity": granularity, "upper_bound_host": upper, "lengths_tried":
           len(best.get("ok", {})) + len(best.get("fail", {})), "search_s": time.perf_counter() - t0}
    if found:
        p = best["ok"][found]   # at the lowest ZeRO stage that fits, as a plan would choose it
        p = planner.quick(found, gpus=args.gpus, sp=sp, host=host, stage=stage, offload=p["offload_optimizer"],
                          swap=swap, params=p["offload_params"]) if stage is None else p
        out["options"] = {"zero_stage": p["zero_stage"], "offload_optimizer": p["offload_optimizer"],
                          "offload_params": p["offload_params"],
                          "keep_layers": p["keep_layers"], "policy_counts": p["policy_counts"],
                          "alpha": p["alpha"], "tile_tokens": p["tile_tokens"],
                          "step_time_s": p["predicted"]["step_time_s"], "mfu": p["predicted"]["mfu"],
                          "device_peak_bytes": p["predicted"]["device_peak_bytes"],
                          "host_bytes_min": p["predicted"]["host_bytes_min"]}
    nxt = found + granularity
    if nxt > upper:
        out["limit"] = {"kind": "host memory", "detail": f"{nxt:,} tokens: the host cannot hold the inputs of {on_host} layers "
                                                         f"({format_bytes(per_token * nxt / sp)} per rank)"}
    else:
        failed = best.get("fail", {}).get(nxt)
        if failed is None and at(nxt) is None:
            failed = best.get("fail", {}).get(nxt)
        out["limit"] = dict(what_limits(failed), seq_len=nxt) if failed is not None else {"kind": "", "detail": ""}
    return out


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
    elif not args.offload_params and args.zero_stage in (None, 3) and fits_at(seq_len, offload=True, params=True,
                                                                               stage=3):
        out.append("--offload-optimizer --offload-params" if not args.offload_optimizer else "--offload-params")
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
          f"{', optimizer offloaded to the host' if plan['offload_optimizer'] else ''}"
          f"{', weights too (parameter offload)' if plan.get('offload_params') else ''}")
    for t in plan.get("stages_tried", [])[:-1]:
        print(f"           stage {t['zero_stage']} would need {fb(t['device_peak_bytes'])} per GPU")
    print()
    print(f"  {'memory per GPU':<50}{'bytes':>12}  live at peak")
    for name, nbytes, live in memory_rows(plan):
        print(f"  {name:<50}{fb(nbytes):>12}  {'yes' if live else ''}")
    print(f"  {'planned step peak (Level 2)':<50}{fb(plan['step']['peak_bytes']):>12}  at "
          f"{plan['step']['step_labels'][plan['step']['peak_step']]}")
    print(f"  {'device peak (step + reserve)':<50}{fb(pr['device_peak_bytes']):>12}  of {fb(gpu['memory_bytes'])}")
    if "activation_peak_bytes" in pr:
        print(f"  {'  of which activations (no model states)':<50}{fb(pr['activation_peak_bytes']):>12}")
    hmin = pr.get("host_bytes_min")
    print(f"  {'host, per node (this plan)':<50}{fb(pr['host_bytes']):>12}  of {fb(plan['host_memory_bytes'])}")
    if "host_bytes_min" in pr:
        least = ("no mix of layer policies fits the device" if hmin is None else
                 f"{_policy_text(pr['host_bytes_min_policies'])}, slower")
        print(f"  {'host, per node (least this job needs)':<50}{fb(hmin) if hmin is not None else '-':>12}  ({least})")
    print()
    print(f"  {'layout':<18}{'peak':>12}{'lower bound':>14}{'gap':>8}{'greedy':>12}{'MIP gap':>9}{'solve':>8}")
    for name, lay in (("layer forward", plan["layer"]["forward"]), ("layer backward", plan["layer"]["backward"]),
                      ("step (Level 2)", plan["step"])):
        mg = "-" if lay["mip_gap"] is None else f"{lay['mip_gap']:.2%}"
        print(f"  {name:<18}{fb(lay['peak_bytes']):>12}{fb(lay['lower_bound_bytes']):>14}{lay['gap']:>8.2%}"
              f"{fb(lay['greedy_peak_bytes']):>12}{mg:>9}{lay['solve_s']:>7.1f}s")
    if plan.get("mip"):
        print(f"  MIP: {plan['mip']}")
    sw, ad, t = plan["swap"], plan["alpha_detail"], pr["times"]
    print()
    if "layer_policies" in plan:
        tile = plan.get("tile_tokens")
        chosen = "chosen" if plan.get("keep_layers_chosen") else "--keep-layers"
        ps = plan.get("policy_search", {})
        print(f"layers:    {_policy_text(plan['layer_policies'])} (keep {plan['keep_layers']}: {chosen}; the fastest "
              f"of {ps.get('considered', '?')} mixes, {ps.get('fitting', '?')} fit); MLP "
              f"{'tile ' + format(tile, ',') + ' tokens' if tile else 'untiled'}")
    if sw.get("memo_layers", 1):
        print(f"alpha:     {plan['alpha']:.3f}  ({ad['reason']}; copy-time bound {ad['time_bound']:.3f}, host bound "
              f"{ad['memory_bound']:.3f})")
    else:
        print("alpha:     - (no 'memo' layers)")
    print(f"           per 'memo' layer: swap {fb(sw['swapped_bytes_per_layer'])} (input {fb(sw['layer_input_bytes'])}, "
          f"attention {fb(sw['attention_output_bytes'])}, {plan['alpha']:.3f} of {fb(sw['other_bytes'])} other), "
          f"recompute {fb(sw['recomputed_bytes_per_layer'])}; per 'input' layer: swap "
          f"{fb(sw.get('input_swapped_bytes_per_layer', sw['layer_input_bytes']))}")
    exposed = "hidden" if t["copy_exposed_s"] == 0 else f"{t['copy_exposed_s']:.1f} s exposed per step"
    print(f"predicted: step {pr['step_time_s']:.1f} s, MFU {pr['mfu']:.1%}; per layer forward "
          f"{t['layer_forward_s']:.2f} s, backward {t['layer_backward_s']:.2f} s; copy "
          f"{t['copy_out_s']:.2f} s each way ({exposed})")
    if "recompute_per_step_s" in t:
        print(f"           recompute per step {t['recompute_per_step_s']:.1f} s: 'memo' layers "
              f"{t['layer_recompute_s']:.2f} s each, 'input' layers {t['layer_input_recompute_s']:.2f} s each "
              f"(attention again), tiled MLP {t['mlp_recompute_s']:.2f} s per layer")
    if plan.get("offload_params"):
        # NOTE [ Step-time model ] rule 9 in planner/cost.py.
        print(f"           parameter offload per layer: weights in {_secs(t['param_copy_s'])} (forward, again in "
              f"backward), gradients out {_secs(t['grad_copy_s'])}; exposed {_secs(t['param_offload_exposed_s'])} "
              f"per step")
    print(_sp_comm_line(plan))
    search = plan.get("max_seq_len_search")
    if search is not None:
        o = search.get("options")
        if o:
            print(f"max length: {search['max_seq_len']:,} tokens fit on this cluster with ZeRO stage {o['zero_stage']}"
                  f"{', optimizer offloaded' if o['offload_optimizer'] else ', optimizer on the GPUs'}"
                  f"{', parameters offloaded' if o.get('offload_params') else ''}, "
                  f"{_count_text(o['policy_counts'])}, MLP {'tile ' + format(o['tile_tokens'], ',') if o['tile_tokens'] else 'untiled'}: "
                  f"step {o['step_time_s']:.1f} s, MFU {o['mfu']:.1%} (greedy layouts)")
        else:
            print("max length: no length fits this cluster")
        lim = search.get("limit", {})
        if lim.get("kind"):
            print(f"           limited by {lim['kind']} at {lim.get('seq_len', 0):,} tokens: {lim['detail']}")
    elif plan.get("max_seq_len") is not None:
        print(f"max length: {plan['max_seq_len']:,} tokens fit on this cluster (greedy layouts)")
    print(f"fits:      {'yes' if plan['fits'] else 'NO: ' + '; '.join(plan['reasons'])}")


def _count_text(counts: dict) -> str:
    parts = [f"{counts[p]} {p}" for p in ("memo", "input", "kept") if counts.get(p)]
    return " + ".join(parts) + " layers"


def _policy_text(policies: list) -> str:
    return _count_text({p: policies.count(p) for p in ("memo", "input", "kept")})


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
