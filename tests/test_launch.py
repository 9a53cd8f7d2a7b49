"""`memo launch` and `memo env`: dry runs, refusals before any process starts, and a real 2-process launch.

The real launch runs the shipped examples/accelerate/memo_cpu.yaml with a probe script
(tests/sp_workers/accel_launch_probe.py) that reads memo's settings with MemoPlugin(), starts
Accelerator() and trains one step through memo.integrations.accelerate.prepare.
"""

import json
import os
import re
import subprocess
import sys
from importlib import metadata

import pytest
import yaml

import memo.cli.launch
from memo.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "accelerate", "memo_cpu.yaml")
PROBE = os.path.join(ROOT, "tests", "sp_workers", "accel_launch_probe.py")
TRICKY = ["x y", "$(touch pwned)", "a;b", "--json"]   # reach the script verbatim: no shell, not memo's flags


def _write(tmp_path, data, name="memo.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def _config(**memo_section):
    with open(EXAMPLE) as f:
        data = yaml.safe_load(f)
    data["memo"] = memo_section
    return data


@pytest.fixture
def no_process(monkeypatch):
    """Fails the test if memo launch starts anything."""
    started = []
    monkeypatch.setattr(memo.cli.launch.subprocess, "run", lambda *a, **k: started.append(a) or pytest.fail(
        f"memo launch started a process: {a}"))
    return started


def test_dry_run_prints_the_argument_list_the_variables_and_accelerates_part(capsys):
    code = main(["launch", "--config_file", EXAMPLE, "--dry-run", "--json", PROBE, *TRICKY])
    out, err = capsys.readouterr()
    assert code == 0, err
    plan = json.loads(out)
    cmd = plan["command"]
    assert cmd[:3] == [sys.executable, "-m", "memo.cli.accelerate_run"]   # NOTE [ The job's exit code ]
    assert cmd[cmd.index("--config_file") + 1] == "<temporary accelerate config>"
    assert cmd[-len(TRICKY) - 1:] == [PROBE, *TRICKY], "script arguments must pass as separate, untouched items"
    assert "--multi_gpu" in cmd and plan["env"]["ACCELERATE_USE_CPU"] == "true"   # NOTE [ Multi-CPU on one machine ]
    assert plan["env"]["MEMO_SEQUENCE_PARALLEL_SIZE"] == "2" and plan["env"]["MEMO_SWAP_RATIO"] == "0.5"
    assert plan["env"]["MEMO_HOST_MEMORY_BUDGET"] == "2GiB" and plan["env"]["MEMO_SP_BACKEND"] == "ring"
    with open(EXAMPLE) as f:
        original = yaml.safe_load(f)
    assert plan["accelerate_config"] == {k: v for k, v in original.items() if k != "memo"}
    assert (plan["num_processes"], plan["sequence_parallel_size"], plan["data_parallel_size"]) == (2, 2, 1)

    code = main(["launch", "--config_file", EXAMPLE, "--dry-run", PROBE])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "data parallel 1 x sequence parallel 2 (ring, zigzag)" in out and "MEMO_SWAP_RATIO=0.5" in out
    assert "memo:" not in out and "distributed_type: MULTI_CPU" in out


def test_a_config_without_memo_section_or_multi_cpu_passes_through(tmp_path, capsys):
    path = _write(tmp_path, {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_processes": 1})
    assert main(["launch", "--config_file", path, "--dry-run", "--json", PROBE]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["env"] == {} and "--multi_gpu" not in plan["command"]


@pytest.mark.parametrize("memo_section,words", [
    ({"swap_ration": 0.5}, ["unknown key memo.swap_ration", "sequence_parallel_size", "fix its spelling"]),
    ({"sequence_parallel_size": "2"}, ["memo.sequence_parallel_size='2' must be an integer >= 1"]),
    ({"swap_ratio": "half"}, ["memo.swap_ratio='half' is neither a number nor 'auto'"]),
    ({"sp_backend": "star"}, ["memo.sp_backend='star' is not one of ring, ulysses, hybrid"]),
    ({"sequence_parallel_size": 3}, ["memo.sequence_parallel_size=3 does not divide num_processes=2",
                                     "one of [1, 2]", "multiple of 3"]),
    ({"plan": "no-such-plan.json"}, ["memo.plan='no-such-plan.json' does not exist", "memo plan"]),
    ("not a mapping", ["'memo' section must be a mapping"]),
])
def test_bad_memo_sections_are_refused_with_exit_2_before_any_process_starts(tmp_path, capsys, no_process,
                                                                            memo_section, words):
    path = _write(tmp_path, _config(**memo_section) if isinstance(memo_section, dict)
                  else {**_config(), "memo": memo_section})
    code = main(["launch", "--config_file", path, PROBE])
    out, err = capsys.readouterr()
    assert code == 2 and not no_process
    for w in words:
        assert w in err, err


def test_unsafe_or_broken_files_are_refused(tmp_path, capsys, no_process, monkeypatch):
    monkeypatch.chdir(tmp_path)
    unsafe = _write(tmp_path, "!!python/object/apply:os.system ['touch pwned']\n", "unsafe.yaml")
    cases = {
        unsafe: "is not valid YAML",                            # yaml.safe_load: no Python objects
        _write(tmp_path, "a: [1,\n", "broken.yaml"): "is not valid YAML",
        _write(tmp_path, "- 1\n- 2\n", "list.yaml"): "must hold a mapping",
        str(tmp_path / "missing.yaml"): "cannot read --config_file",
        _write(tmp_path, yaml.safe_dump({**_config(), "num_processes": "2"}), "np.yaml"): "num_processes='2'",
    }
    for path, words in cases.items():
        assert main(["launch", "--config_file", path, PROBE]) == 2
        assert words in capsys.readouterr().err, path
    assert not (tmp_path / "pwned").exists()
    assert main(["launch", "--config_file", EXAMPLE, str(tmp_path / "no_script.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_memo_env_reports_integrations_and_sequence_parallel_backends(capsys):
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["accelerate"] == version("accelerate")
    ds = version("deepspeed")
    assert info["deepspeed"] == ds if ds else info["deepspeed"].startswith("not installed")
    assert set(info["sp_backends"]) == {"ring", "ulysses", "hybrid", "flash_attn"}
    for name in ("ring", "ulysses", "hybrid"):
        assert info["sp_backends"][name].startswith("available")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert info["sp_backends"]["flash_attn"].startswith("not installed")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^accelerate\s+" + re.escape(info["accelerate"]) + "$", out, re.M)
    assert re.search(r"^  ulysses\s+available", out, re.M)


def _memo_launch(*argv, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "memo.cli.main", "launch", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_launching_the_example_config_runs_two_sequence_parallel_processes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    run = _memo_launch("--config_file", EXAMPLE, PROBE, str(out), *TRICKY)
    assert run.returncode == 0, run.stderr[-4000:]
    seen = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    with open(EXAMPLE) as f:
        section = yaml.safe_load(f)["memo"]
    for rank, s in enumerate(seen):
        assert (s["rank"], s["world"], s["distributed_type"], s["backend"]) == (rank, 2, "DistributedType.MULTI_CPU",
                                                                               "gloo")
        assert s["plugin"] == section, "every process must see the memo section through MEMO_* variables"
        assert s["argv"] == TRICKY
        assert s["sp_ranks"] == [0, 1] and s["shard_len"] == 16 and s["swapped_bytes"] > 0
    assert seen[0]["loss"] == seen[1]["loss"] and 0 < seen[0]["loss"] < 10
    assert not (tmp_path / "pwned").exists() and not os.path.exists(os.path.join(ROOT, "pwned"))
    tmp_config = re.search(r"--config_file (\S+accelerate_config\.yaml)", run.stderr)
    assert tmp_config and not os.path.exists(tmp_config.group(1)), "the temporary accelerate config must be removed"


def test_a_failing_script_fails_the_launch_with_its_exit_code(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys; sys.exit(3)\n")
    path = _write(tmp_path, {"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO", "num_processes": 1,
                             "mixed_precision": "no", "use_cpu": True, "memo": {"swap_ratio": 0.5}})
    run = _memo_launch("--config_file", path, str(script))
    assert run.returncode == 3, run.stderr[-2000:]


def test_a_rank_that_fails_gives_the_job_its_exit_code(tmp_path):
    """NOTE [ The job's exit code ]: rank 1 exits 3 (Accelerate alone exits 1), rank 0 exits 0."""
    script = tmp_path / "rank1_fails.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    run = _memo_launch("--config_file", EXAMPLE, str(script))
    assert run.returncode == 3, run.stderr[-3000:]
    assert "exit code 3" in run.stderr


def _bomb(levels: int = 9) -> str:
    """A YAML alias bomb: 9 ** 9 (387 million) strings from a 300-byte file."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nnum_processes: 2\n"


@pytest.mark.parametrize("content, words", [
    (_bomb(), ["expands to more than 100000 values", "YAML aliases"]),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["is not UTF-8 text", "byte 0x89 at offset 0"]),
    ("# padding\n" * 200_000, ["is larger than 1048576 bytes"]),
    ("[" * 50_000, ["nest"]),   # libyaml: "exceeded maximum nesting depth"; PyYAML: RecursionError
    (yaml.safe_dump({**_config(), "num_processes": 1_000_000_000_001}), ["num_processes=1000000000001",
                                                                          "from 1 to 1048576"]),
    (yaml.safe_dump({**_config(sequence_parallel_size=2), "num_processes": 1_048_573}),
     ["sequence_parallel_size=2 does not divide num_processes=1048573", "one of [1, 1048573]"]),
])
def test_absurd_config_files_are_refused_quickly_in_bounded_memory(tmp_path, capsys, no_process, content, words):
    import time
    import tracemalloc
    path = tmp_path / "absurd.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        code = main(["launch", "--config_file", str(path), "--dry-run", "--json", PROBE])
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    err = capsys.readouterr().err
    assert code == 2 and not no_process, err
    assert str(path) in err, err
    for w in words:
        assert w in err, err
    assert seconds < 10, f"took {seconds:.1f} s"
    assert peak < 64 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


def test_a_script_that_is_a_directory_is_reported_as_one(tmp_path, capsys, no_process):
    assert main(["launch", "--config_file", EXAMPLE, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err, err


@pytest.fixture(scope="module")
def zero_plan(tmp_path_factory):
    """A plan for a tiny Llama on 2 GPUs at ZeRO stage 2 (memo plan --out)."""
    from models import build
    d = tmp_path_factory.mktemp("zero-plan")
    build("llama").config.to_json_file(str(d / "config.json"))
    out = d / "plan.json"
    assert main(["plan", "--model", str(d / "config.json"), "--seq-len", "64", "--gpus", "2", "--sp", "1",
                 "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32", "--zero-stage", "2",
                 "--time-limit", "2", "--out", str(out)]) == 0
    return str(out)


def _deepspeed_config(**memo_section):
    data = _config(**memo_section)
    data["distributed_type"] = "DEEPSPEED"
    return data


def test_the_plans_zero_stage_becomes_the_deepspeed_config(tmp_path, capsys, zero_plan):
    path = _write(tmp_path, _deepspeed_config(plan=zero_plan))
    assert main(["launch", "--config_file", path, "--dry-run", "--json", PROBE]) == 0
    launch = json.loads(capsys.readouterr().out)
    assert launch["deepspeed_config"]["zero_optimization"]["stage"] == json.load(open(zero_plan))["zero_stage"] == 2
    assert "deepspeed_config_file" in launch["accelerate_config"]["deepspeed_config"]


@pytest.mark.parametrize("extra, words", [
    ({"deepspeed_config": {"zero_stage": 3}}, ["zero_stage is 3 but the plan", "chose ZeRO stage 2"]),
    ({"deepspeed_config": {"deepspeed_config_file": "ds.json"}}, ["both set the DeepSpeed config"]),
])
def test_a_deepspeed_config_the_plan_contradicts_is_refused(tmp_path, capsys, no_process, zero_plan, extra, words):
    path = _write(tmp_path, {**_deepspeed_config(plan=zero_plan), **extra})
    assert main(["launch", "--config_file", path, PROBE]) == 2 and not no_process
    err = capsys.readouterr().err
    for w in words:
        assert w in err, err


def test_sequence_parallelism_under_the_deepspeed_plugin_is_refused(tmp_path, capsys, no_process):
    path = _write(tmp_path, _deepspeed_config(sequence_parallel_size=2))
    assert main(["launch", "--config_file", path, PROBE]) == 2 and not no_process
    assert "not supported" in capsys.readouterr().err
