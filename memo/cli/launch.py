"""``memo launch``: ``accelerate launch`` with a config file that also holds memo's settings.

    memo launch --config_file memo.yaml train.py --max-steps 100

``memo.yaml`` is an ordinary ``accelerate config`` file plus a ``memo:`` section of
``memo.integrations.accelerate.MemoPlugin`` fields. memo reads it with ``yaml.safe_load``, checks the
section (unknown key, wrong type, a sequence-parallel size that does not divide ``num_processes``:
refused with exit code 2 before any process starts), writes the rest to a temporary file for
Accelerate, exports the settings as ``MEMO_*`` variables (``MemoPlugin()`` reads them in every
process) and runs ``accelerate launch --config_file TMP train.py ARGS`` as an argument list, never
through a shell. The exit code is the job's: that of the first rank that failed (NOTE [ The job's
exit code ]).

# NOTE [ Bounded config files ]
#
# 1. A config file is read as at most MAX_CONFIG_BYTES bytes of UTF-8; a larger or binary file is
#    refused by name before YAML parses it.
# 2. YAML aliases share one object, so a small file can describe an enormous tree (an alias bomb)
#    that copying, printing or dumping would expand. After parsing, memo walks the tree counting
#    every value as often as it is reached and refuses it past MAX_CONFIG_VALUES, in bounded time.
# 3. ``num_processes`` is at most MAX_PROCESSES; divisors are found up to its square root.

# NOTE [ The job's exit code ]
#
# 1. ``accelerate launch`` exits 1 when a rank fails (torch.distributed.run raises
#    ChildFailedError; one process raises CalledProcessError), whatever the rank's code.
# 2. memo runs it through ``python -m memo.cli.accelerate_run``, which calls Accelerate's own
#    ``main()`` and exits with the first failed rank's code (128 + N for a rank killed by signal N).

# NOTE [ Multi-CPU on one machine ]
#
# 1. ``accelerate launch`` (1.15) starts a MULTI_CPU job's processes only through mpirun (an
#    ``mpirun_hostfile``); without one it runs ONE process, whatever ``num_processes`` says.
# 2. For a MULTI_CPU config without a hostfile, memo adds ``--multi_gpu``, which makes Accelerate
#    start ``num_processes / num_machines`` processes on this machine through torch.distributed.run
#    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set), and exports ``ACCELERATE_USE_CPU=true``, so that
#    ``Accelerator()`` in each of them picks MULTI_CPU over gloo. The config file itself is passed on
#    unchanged, so several machines (``num_machines``, ``machine_rank``, ``main_process_ip``,
#    ``main_process_port``) form one job, one ``memo launch`` on each (tests/test_launch_multinode.py
#    plays two machines on the loopback address).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from memo.cli.emit_config import check_launch
from memo.errors import MemoError

MAX_CONFIG_BYTES = 1 << 20        # an accelerate config is a few hundred bytes; 1 MiB is generous
MAX_CONFIG_VALUES = 100_000       # values in the parsed tree, each counted as often as aliases reach it
MAX_PROCESSES = 1 << 20           # more ranks than any machine room holds


def launch_command_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="run a training script with accelerate launch and memo's settings from the config file",
        description="Run `accelerate launch` with an accelerate config file that also has a `memo:` section "
                    "(MemoPlugin fields, exported as MEMO_* variables).")
    p.add_argument("--config_file", "--config-file", required=True,
                   help="accelerate config YAML with an optional `memo:` section")
    p.add_argument("--dry-run", "--dry_run", action="store_true",
                   help="print the command, the MEMO_* variables and Accelerate's config, and exit 0")
    p.add_argument("--json", action="store_true", help="print the launch (or dry run) as one JSON object")
    p.add_argument("script", help="the training script")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(func=launch_command)


def accelerate_cli() -> list[str]:
    """How to run ``accelerate launch`` from this Python: memo's runner of its module (NOTE [ The job's
    exit code ]), or the console script beside it."""
    import importlib.util
    if importlib.util.find_spec("accelerate.commands.launch") is not None:
        return [sys.executable, "-m", "memo.cli.accelerate_run"]
    script = os.path.join(os.path.dirname(sys.executable), "accelerate")
    if os.path.isfile(script):
        return [script, "launch"]
    raise MemoError("memo.launch: Accelerate is not installed for " + sys.executable + "; pip install accelerate")


def _read_text(path: str) -> str:
    """NOTE [ Bounded config files ] rule 1."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise MemoError(f"memo.launch: cannot read --config_file {path!r} ({e.strerror}); pass an accelerate "
                        f"config YAML (see examples/accelerate/memo_cpu.yaml)") from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise MemoError(f"memo.launch: {path} is larger than {MAX_CONFIG_BYTES} bytes; an accelerate config is a "
                        f"few hundred bytes: pass the config file, not another file")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemoError(f"memo.launch: {path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}): not "
                        f"a YAML config; pass an accelerate config YAML") from e


def _check_size(data, path: str) -> None:
    """NOTE [ Bounded config files ] rule 2: at most MAX_CONFIG_VALUES values, aliases counted each time."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise MemoError(f"memo.launch: {path} expands to more than {MAX_CONFIG_VALUES} values (YAML aliases "
                            f"repeating one another); an accelerate config has a few dozen: write it out plainly")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def read_config(path: str) -> tuple[dict, dict]:
    """(Accelerate's part of the config, memo's checked settings); MemoError for anything memo refuses."""
    import yaml

    from memo.integrations.accelerate import check_settings
    text = _read_text(path)
    try:   # libyaml when present: faster, and it bounds nesting itself
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise MemoError(f"memo.launch: {path} is not valid YAML ({e}); fix the file") from e
    except RecursionError as e:
        raise MemoError(f"memo.launch: {path} nests too deeply to be an accelerate config; fix the file") from e
    _check_size(data, path)
    if not isinstance(data, dict):
        raise MemoError(f"memo.launch: {path} must hold a mapping of accelerate settings (compute_environment, "
                        f"num_processes, ...) and a `memo:` section, got {type(data).__name__}")
    data = dict(data)
    settings = check_settings(data.pop("memo", None), where="memo")
    processes = data.get("num_processes", 1)
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= MAX_PROCESSES:
        raise MemoError(f"memo.launch: num_processes={processes!r} in {path} must be an integer from 1 to "
                        f"{MAX_PROCESSES} (all processes of the job, over all machines)")
    sp = settings.get("sequence_parallel_size", 1)
    if processes % sp:
        raise MemoError(f"memo.launch: memo.sequence_parallel_size={sp} does not divide num_processes={processes} in "
                        f"{path}; set memo.sequence_parallel_size to one of {_divisors(processes)}, or num_processes "
                        f"to a multiple of {sp}")
    if settings.get("plan") and not os.path.isabs(settings["plan"]):
        settings["plan"] = os.path.abspath(settings["plan"])   # the script may change directory
    return data, settings


def _multi_cpu_without_mpirun(config: dict) -> bool:
    """See NOTE [ Multi-CPU on one machine ] rule 1."""
    mpirun = config.get("mpirun_config") or {}
    return (str(config.get("distributed_type", "")).upper() == "MULTI_CPU" and config.get("num_processes", 1) > 1
            and not (isinstance(mpirun, dict) and mpirun.get("mpirun_hostfile")))


def deepspeed_from_plan(config: dict, settings: dict) -> Optional[dict]:
    """Under Accelerate's DeepSpeed plugin with a memo plan: the DeepSpeed config of the plan's ZeRO stage.

    Refused before any process starts: sequence parallelism under the DeepSpeed plugin (Accelerate
    cannot hand DeepSpeed memo's groups; use DDP or memo.integrations.deepspeed.initialize), and a
    config that names a ZeRO stage or a DeepSpeed config file the plan contradicts.
    """
    if str(config.get("distributed_type", "")).upper() != "DEEPSPEED":
        return None
    if settings.get("sequence_parallel_size", 1) > 1:
        raise MemoError("memo.launch: memo.sequence_parallel_size > 1 under distributed_type DEEPSPEED is not "
                        "supported (Accelerate cannot give DeepSpeed memo's sequence-parallel groups); use "
                        "distributed_type MULTI_GPU / MULTI_CPU, or memo.integrations.deepspeed.initialize in the script")
    if settings.get("plan") is None:
        return None
    from memo.integrations.deepspeed import memo_zero_config
    ds = memo_zero_config(settings["plan"])
    given = config.get("deepspeed_config") or {}
    if given.get("deepspeed_config_file"):
        raise MemoError(f"memo.launch: deepspeed_config.deepspeed_config_file and memo.plan both set the DeepSpeed "
                        f"config; remove one (memo writes the plan's: ZeRO stage {ds['zero_optimization']['stage']})")
    if "zero_stage" in given and int(given["zero_stage"]) != ds["zero_optimization"]["stage"]:
        raise MemoError(f"memo.launch: deepspeed_config.zero_stage is {given['zero_stage']} but the plan "
                        f"{settings['plan']} chose ZeRO stage {ds['zero_optimization']['stage']}; remove zero_stage "
                        f"(memo writes the plan's) or make the plan again with --zero-stage {given['zero_stage']}")
    return ds


def plan_launch(config: dict, settings: dict, config_path: str, script: str, script_args: list[str]) -> dict:
    """The command (a list), the variables to export and what they mean; nothing is written or run."""
    from memo.integrations.accelerate import settings_env
    cmd = accelerate_cli() + ["--config_file", config_path]
    env = settings_env(settings)
    if _multi_cpu_without_mpirun(config):   # NOTE [ The job's exit code ]
#
# 1. ``accelerate launch`` exits 1 when a rank fails (torch.distributed.run raises
#    ChildFailedError; one process raises CalledProcessError), whatever the rank's code.
# 2. memo runs it through ``python -m memo.cli.accelerate_run``, which calls Accelerate's own
#    ``main()`` and exits with the first failed rank's code (128 + N for a rank killed by signal N).

# NOTE [ Multi-CPU on one machine ] rule 2
        cmd.append("--multi_gpu")
        env["ACCELERATE_USE_CPU"] = "true"
    cmd += [script, *script_args]
    processes = config.get("num_processes", 1)
    sp = settings.get("sequence_parallel_size", 1)
    return {"command": cmd, "env": env, "accelerate_config": config, "memo": settings, "num_processes": processes,
            "sequence_parallel_size": sp, "data_parallel_size": processes // sp}


def _describe(launch: dict) -> str:
    s = launch["memo"]
    sp = launch["sequence_parallel_size"]
    parts = [f"{launch['num_processes']} process(es)"]
    if sp > 1:
        parts.append(f"data parallel {launch['data_parallel_size']} x sequence parallel {sp} "
                     f"({s.get('sp_backend', 'ring')}, {s.get('sp_layout', 'zigzag')})")
    env = " ".join(f"{k}={v}" for k, v in launch["env"].items()) or "(no memo settings)"
    return f"memo launch: {', '.join(parts)}; {env}\nmemo launch: {shlex.join(launch['command'])}"


def launch_command(args) -> int:
    try:
        config, settings = read_config(args.config_file)
        check_launch(config, settings, args.config_file)   # NOTE [ Plan to launch ] rule 4
        deepspeed = deepspeed_from_plan(config, settings)
        if os.path.isdir(args.script):
            raise MemoError(f"memo.launch: script {args.script!r} is a directory; pass the path of a training script "
                            f"(a .py file)")
        if not os.path.isfile(args.script):
            raise MemoError(f"memo.launch: script {args.script!r} does not exist; pass the path of a training script")
        if args.dry_run:
            if deepspeed is not None:
                config = dict(config, deepspeed_config={"deepspeed_config_file": "<temporary deepspeed config>"})
            launch = plan_launch(config, settings, "<temporary accelerate config>", args.script, args.script_args)
            launch["deepspeed_config"] = deepspeed
            if args.json:
                print(json.dumps(launch, indent=2, sort_keys=True))
            else:
                print(_describe(launch))
                print("memo launch: accelerate config (memo section removed):")
                import yaml
                print(yaml.safe_dump(config, sort_keys=False).rstrip())
            return 0
    except MemoError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    tmp = tempfile.mkdtemp(prefix="memo-launch-")
    try:
        import yaml
        if deepspeed is not None:   # the plan's ZeRO stage, as a DeepSpeed config file for Accelerate
            ds_path = os.path.join(tmp, "deepspeed_config.json")
            with open(ds_path, "w") as f:
                json.dump(deepspeed, f, indent=2)
            config = dict(config, deepspeed_config={"deepspeed_config_file": ds_path})
        path = os.path.join(tmp, "accelerate_config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        launch = plan_launch(config, settings, path, args.script, args.script_args)
        sys.stderr.write((json.dumps(launch, sort_keys=True) if args.json else _describe(launch)) + "\n")
        sys.stderr.flush()
        try:
            return subprocess.run(launch["command"], env={**os.environ, **launch["env"]}).returncode
        except KeyboardInterrupt:
            return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
