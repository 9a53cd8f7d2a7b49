"""From plan to launch: ``memo plan ... --out plan.json --emit-config run.yaml``.

Writes the Accelerate config file of the plan, with memo's section, that ``memo launch --config_file
run.yaml train.py`` runs unchanged; and checks, in ``memo launch``, that a config naming a plan
still says what the plan planned.

# NOTE [ Plan to launch ]
#
# 1. How the job shards its model states follows the plan's ZeRO stage and offload, and the
#    sequence-parallel degree P:
#    stage 0                     -> distributed_type MULTI_GPU (DDP; memo's hook sums over a
#                                   sequence's ranks, NOTE [ Gradients under data x sequence parallelism ]);
#    P = 1, stage 1-3            -> DEEPSPEED; memo launch writes the plan's DeepSpeed config
#                                   (memo.cli.launch.deepspeed_from_plan);
#    P > 1, stage 3              -> FSDP with fsdp_version 2, each decoder layer a unit, resharded
#                                   after forward (NOTE [ FSDP2 and sequence parallelism ]);
#                                   ``--offload-params`` -> fsdp_offload_params (FSDP2 offloads weights,
#                                   gradients and the optimizer step together).
# 2. Under P > 1 Accelerate's DeepSpeed plugin cannot carry memo's sequence-parallel groups, and
#    FSDP2 has no stage 1 or 2 of its own; so with --emit-config and P > 1 memo plan chooses among
#    stage 0 (DDP) and stage 3 (FSDP2) only, and refuses --zero-stage 1 or 2 and an optimizer-only
#    offload. FSDP2's memory is counted as ZeRO-3's: weights, gradients and optimizer states 1/W per
#    rank plus the gathered weights of two layers (the one running and the one prefetched).
# 3. The memo section carries P, the SP backend, the plan file (absolute) and the host budget per
#    rank (the plan's host memory per node divided among the node's ranks).
# 4. ``memo launch`` refuses (exit 2, before any process starts) a config naming a plan that it
#    contradicts: num_processes other than the plan's GPUs, sequence_parallel_size other than its
#    SP degree, FSDP under a plan whose stage is not 3, MULTI_GPU under a stage above 0, and SP under
#    FSDP1 (fsdp_version 1, Accelerate's default).
# 5. Over several machines, memo's sequence-parallel groups (blocks of P consecutive ranks; a
#    machine's ranks are consecutive) lie inside a machine when P divides its processes, and span
#    whole machines when P is a multiple of them (then ``sp_backend: hybrid`` runs Ulysses inside a
#    machine and the ring across). Any other P makes some groups straddle two machines: refused.
#    Groups over whole machines with ``sp_backend: ring`` run: ``memo launch`` says on stderr that
#    each ring step then crosses the network and that hybrid keeps all but one step inside a machine.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from memo.errors import MemoError

_MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def check_args(args, sp: int) -> None:
    """--emit-config's own checks, before any planning (NOTE [ Plan to launch ] rule 2)."""
    if not getattr(args, "emit_config", None):
        return
    if not args.out:
        raise MemoError("memo.plan: --emit-config needs --out PLAN.json: the config's memo section names the plan "
                        "file; add --out plan.json")
    if sp > 1 and args.zero_stage in (1, 2):
        raise MemoError(f"memo.plan: --emit-config with --sp {sp} and --zero-stage {args.zero_stage}: under sequence "
                        f"parallelism Accelerate runs DDP (stage 0) or FSDP2 (stage 3) with memo; Accelerate's "
                        f"DeepSpeed plugin cannot carry memo's sequence-parallel groups. Pass --zero-stage 3 (or 0), "
                        f"or leave it out, or drop --emit-config and call memo.integrations.deepspeed.initialize in "
                        f"the script")
    if sp > 1 and args.offload_optimizer and not args.offload_params:
        raise MemoError(f"memo.plan: --emit-config with --sp {sp} runs FSDP2, which offloads the weights with the "
                        f"optimizer states (it has no optimizer-only offload); add --offload-params (and --zero-stage "
                        f"3), or drop --offload-optimizer")


def launch_stages(args, sp: int) -> Optional[list]:
    """The ZeRO stages memo plan may choose among for the launch config, or None for all of them."""
    if not getattr(args, "emit_config", None) or sp == 1 or args.zero_stage is not None:
        return None
    return [3] if args.offload_params else [0, 3]


def plan_for_launch(plan_for_stages, ctx, args, sp: int):
    """``plan_for_stages(ctx, args.zero_stage)``, or over the stages the launch config can run."""
    stages = launch_stages(args, sp)
    if stages is None:
        return plan_for_stages(ctx, args.zero_stage)
    tried = []
    for stage in stages:
        plan, some = plan_for_stages(ctx, stage)
        plan["zero_stage_chosen"] = True
        tried += some
        if plan["fits"]:
            break
    return plan, tried


def accelerate_config(plan: dict, plan_path: str) -> dict:
    """The Accelerate config (with its ``memo:`` section) that runs ``plan`` (NOTE [ Plan to launch ])."""
    from memo.integrations.deepspeed import decoder_layer_classes
    gpus, per_node, sp, stage = plan["gpus"], plan["gpus_per_node"], plan["sp"], plan["zero_stage"]
    machines = -(-gpus // per_node)
    config = {"compute_environment": "LOCAL_MACHINE"}
    if stage == 0:
        config["distributed_type"] = "MULTI_GPU"
    elif sp == 1:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {}   # memo launch writes the plan's (memo.cli.launch.deepspeed_from_plan)
    else:
        assert stage == 3, f"memo.plan: stage {stage} with SP {sp} reached the launch config (bug in memo)"
        layers = decoder_layer_classes(plan["model"].get("model_type", ""))
        if not layers:
            raise MemoError(f"memo.plan: --emit-config does not know the decoder layer class of model type "
                            f"{plan['model'].get('model_type')!r} (FSDP2 wraps each one); write fsdp_config."
                            f"fsdp_transformer_layer_cls_to_wrap into the config yourself, or plan a transformers "
                            f"model type")
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = {
            "fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": ",".join(layers), "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": bool(plan.get("offload_params")), "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_cpu_ram_efficient_loading": False, "fsdp_activation_checkpointing": False}
    config.update({
        "num_processes": gpus, "num_machines": machines, "machine_rank": 0,
        "main_process_port": 29500, "rdzv_backend": "static", "same_network": True,
        "mixed_precision": _MIXED[plan.get("dtype", "bf16")], "use_cpu": False, "main_training_function": "main",
        "debug": False})
    ranks_per_node = min(gpus, per_node)
    config["memo"] = {"sequence_parallel_size": sp, "sp_backend": plan.get("sp_backend", "ring"),
                      "plan": os.path.abspath(plan_path),
                      "host_memory_budget": int(plan["host_memory_bytes"]) // ranks_per_node}
    return config


def _header(plan: dict, config: dict, plan_path: str, path: str) -> str:
    from memo.planner.units import format_bytes
    peak = plan["predicted"]["device_peak_bytes"]
    lines = [f"memo launch --config_file {os.path.basename(path)} train.py",
             "",
             f"Written by memo plan from {os.path.basename(plan_path)}: {plan.get('model_name', 'model')}, "
             f"{plan['seq_len']:,} tokens per sequence on {plan['gpus']} {plan.get('gpu', {}).get('name', 'GPU')}(s), "
             f"sequence parallel {plan['sp']} ({plan.get('sp_backend', 'ring')}), ZeRO stage {plan['zero_stage']} "
             f"as {config['distributed_type']}, predicted device peak {format_bytes(peak)} per GPU.",
             "memo launch checks this file against the plan before any process starts (NOTE [ Plan to launch ])."]
    if config["num_machines"] > 1:
        lines.append(f"{config['num_machines']} machines: on each, set machine_rank (0 on the first) and "
                     f"main_process_ip (the first machine's address).")
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in lines)


def write(path: str, plan: dict, plan_path: str) -> dict:
    import yaml
    config = accelerate_config(plan, plan_path)
    text = _header(plan, config, plan_path, path) + yaml.safe_dump(config, sort_keys=False)
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise MemoError(f"memo.plan: cannot write the launch config to {path!r} ({e.strerror}); pass a path in an "
                        f"existing, writable directory") from e
    return config


def check_machines(config: dict, sp: int, path: str, backend: str = "ring") -> None:
    """NOTE [ Plan to launch ] rule 5: sequence-parallel groups do not straddle machines needlessly."""
    machines, processes = config.get("num_machines") or 1, config.get("num_processes", 1)
    if not isinstance(machines, int) or isinstance(machines, bool) or machines < 1 or processes % machines:
        raise MemoError(f"memo.launch: num_processes={processes} does not split over num_machines={machines} in "
                        f"{path}; set num_processes to the processes of all machines (a multiple of num_machines)")
    per = processes // machines
    if machines > 1 and sp > 1 and per % sp and sp % per:
        fits = sorted({d for d in range(1, per + 1) if per % d == 0} | {per * k for k in range(1, machines + 1)
                                                                          if processes % (per * k) == 0})
        raise MemoError(f"memo.launch: memo.sequence_parallel_size={sp} with {per} processes per machine in {path}: "
                        f"some sequence-parallel groups (blocks of {sp} consecutive ranks) would straddle two "
                        f"machines while others do not; use a size that divides {per} (groups inside a machine) "
                        f"or a multiple of it (whole machines, sp_backend: hybrid for Ulysses inside each): "
                        f"one of {fits}")
    if machines > 1 and sp > per and backend == "ring":
        print(f"memo launch: memo.sequence_parallel_size={sp} spans {sp // per} machines of {per} processes with "
              f"sp_backend ring, so ring steps cross the network; sp_backend: hybrid runs Ulysses inside each "
              f"machine and the ring across them", file=sys.stderr)


def check_launch(config: dict, settings: dict, path: str) -> None:
    """NOTE [ Plan to launch ] rule 4: a config contradicting its plan, or SP under FSDP1, is refused."""
    kind = str(config.get("distributed_type", "")).upper()
    sp = settings.get("sequence_parallel_size", 1)
    fsdp = config.get("fsdp_config") or {}
    check_machines(config, sp, path, settings.get("sp_backend", "ring"))
    if kind == "FSDP" and sp > 1:
        version = fsdp.get("fsdp_version", 1) if isinstance(fsdp, dict) else 1
        if version != 2:
            raise MemoError(f"memo.launch: memo.sequence_parallel_size={sp} under FSDP with fsdp_version {version} in "
                            f"{path}: FSDP1 averages gradients over all ranks and cannot sum them over a sequence's "
                            f"ranks; set fsdp_config.fsdp_version: 2")
    if not settings.get("plan"):
        return
    from memo.planner.planfile import PlanFileError, load_plan
    try:
        plan = load_plan(settings["plan"])
    except PlanFileError as e:
        raise MemoError(str(e)) from e
    where = f"{path} (plan {settings['plan']})"
    if "gpus" in plan and config.get("num_processes", 1) != plan["gpus"]:
        raise MemoError(f"memo.launch: num_processes={config.get('num_processes', 1)} but the plan is for "
                        f"{plan['gpus']} GPUs in {where}; set num_processes: {plan['gpus']} or make the plan again "
                        f"with --gpus {config.get('num_processes', 1)}")
    if "sp" in plan and sp != plan["sp"]:
        raise MemoError(f"memo.launch: memo.sequence_parallel_size={sp} but the plan's sequence-parallel degree is "
                        f"{plan['sp']} in {where}; set sequence_parallel_size: {plan['sp']} or plan again with --sp {sp}")
    stage = plan.get("zero_stage")
    if kind == "FSDP" and stage != 3:
        raise MemoError(f"memo.launch: distributed_type FSDP shards like ZeRO stage 3, but the plan counted stage "
                        f"{stage}'s memory in {where}; make the plan again with --zero-stage 3 or launch it as "
                        f"{'MULTI_GPU' if stage == 0 else 'DEEPSPEED'}")
    if kind == "MULTI_GPU" and stage not in (None, 0):
        raise MemoError(f"memo.launch: distributed_type MULTI_GPU (DDP) keeps whole model states on every GPU, but "
                        f"the plan chose ZeRO stage {stage} in {where}; launch it as "
                        f"{'FSDP (fsdp_version 2)' if stage == 3 and sp > 1 else 'DEEPSPEED'} (memo plan --emit-config "
                        f"writes it) or make the plan again with --zero-stage 0")
