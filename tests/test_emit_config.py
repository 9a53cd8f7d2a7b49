"""From plan to launch: ``memo plan --emit-config`` and ``memo launch``'s checks against the plan
(issue 15 item 4; NOTE [ Plan to launch ] in memo/cli/emit_config.py).

The emitted file runs unchanged under ``memo launch --dry-run`` (every check memo makes before a
process starts) and Accelerate's own config loader reads it; the GPU runs themselves are GPU-only.
"""

import json
import os

import pytest
import yaml

from memo.cli.main import main

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_long_context.py")
PLAN = ["--seq-len", "16K", "--gpu", "a800", "--host-memory", "256GiB", "--no-mip", "--time-limit", "1"]


def _plan(tmp_path, name, *args) -> tuple[int, str, str]:
    out, run = str(tmp_path / f"{name}.json"), str(tmp_path / f"{name}.yaml")
    code = main(["plan", *PLAN, *args, "--out", out, "--emit-config", run])
    return code, out, run


def _dry_run(config_path, capsys) -> tuple[int, dict, str]:
    capsys.readouterr()
    code = main(["launch", "--config_file", config_path, "--dry-run", "--json", SCRIPT])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else {}), captured.err


def _accelerate_reads(config: dict, tmp_path):
    """Accelerate's own loader on the file memo launch hands it (the memo section removed)."""
    from accelerate.commands.config.config_args import load_config_from_file
    path = tmp_path / "accelerate_only.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if k != "memo"}))
    return load_config_from_file(str(path))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    code, plan_path, run = _plan(tmp, "fsdp", "--model", "llama2-7b", "--gpus", "2", "--sp", "2")
    return code, plan_path, run, tmp


def test_sequence_parallel_plan_emits_fsdp2_counted_as_zero3(fsdp_run, capsys, tmp_path):
    code, plan_path, run, _ = fsdp_run
    assert code == 0
    plan = json.load(open(plan_path))
    config = yaml.safe_load(open(run))
    # A 7B model's 16 bytes a parameter do not fit 2 x 80 GB: stage 0 (DDP) tried, then stage 3 (FSDP2),
    # never the DeepSpeed-only stages 1 and 2, which Accelerate cannot run with memo's SP groups.
    assert [s["zero_stage"] for s in plan["stages_tried"]] == [0, 3] and plan["zero_stage"] == 3
    assert config["distributed_type"] == "FSDP"
    assert config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert config["num_processes"] == 2 and config["num_machines"] == 1
    assert config["memo"] == {"sequence_parallel_size": 2, "sp_backend": "ring", "plan": os.path.abspath(plan_path),
                              "host_memory_budget": 256 * 2 ** 30 // 2}
    code, launch, err = _dry_run(run, capsys)
    assert code == 0, err
    assert launch["sequence_parallel_size"] == 2 and launch["num_processes"] == 2
    assert launch["env"]["MEMO_PLAN"] == os.path.abspath(plan_path)
    assert launch["accelerate_config"]["distributed_type"] == "FSDP"
    loaded = _accelerate_reads(config, tmp_path)
    assert str(loaded.distributed_type).endswith("FSDP") and loaded.fsdp_config["fsdp_version"] == 2


def test_stage0_emits_ddp_and_one_sequence_parallel_rank_emits_deepspeed(tmp_path, capsys):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024).save_pretrained(str(tmp_path / "tiny"))
    code, _, run = _plan(tmp_path, "ddp", "--model", str(tmp_path / "tiny" / "config.json"), "--gpus", "2", "--sp", "2")
    assert code == 0 and yaml.safe_load(open(run))["distributed_type"] == "MULTI_GPU"
    assert _dry_run(run, capsys)[0] == 0

    code, plan_path, run = _plan(tmp_path, "ds", "--model", "llama2-7b", "--gpus", "2", "--sp", "1", "--zero-stage", "2")
    assert code == 0
    config = yaml.safe_load(open(run))
    assert config["distributed_type"] == "DEEPSPEED" and config["memo"]["sequence_parallel_size"] == 1
    code, launch, err = _dry_run(run, capsys)
    assert code == 0, err
    assert launch["deepspeed_config"]["zero_optimization"]["stage"] == 2   # memo launch writes the plan's


def _edited(run, tmp_path, **changes) -> str:
    config = yaml.safe_load(open(run))
    for key, value in changes.items():
        where = config
        *parents, last = key.split("__")
        for p in parents:
            where = where[p]
        where[last] = value
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("changes, words", [
    ({"num_processes": 4, "memo__sequence_parallel_size": 2}, "num_processes=4 but the plan is for 2 GPUs"),
    ({"memo__sequence_parallel_size": 1}, "sequence_parallel_size=1 but the plan's sequence-parallel degree is 2"),
    ({"fsdp_config__fsdp_version": 1}, "FSDP1 averages gradients over all ranks"),
    ({"distributed_type": "MULTI_GPU"}, "the plan chose ZeRO stage 3"),
])
def test_an_emitted_config_edited_into_a_contradiction_is_refused(fsdp_run, tmp_path, capsys, changes, words):
    _, _, run, _ = fsdp_run
    code, _, err = _dry_run(_edited(run, tmp_path, **changes), capsys)
    assert code == 2 and words in err, err


def test_fsdp_under_a_plan_of_another_stage_is_refused(tmp_path, capsys):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024).save_pretrained(str(tmp_path / "tiny"))
    code, _, run = _plan(tmp_path, "ddp", "--model", str(tmp_path / "tiny" / "config.json"), "--gpus", "2", "--sp", "2")
    assert code == 0
    edited = _edited(run, tmp_path, distributed_type="FSDP", fsdp_config={"fsdp_version": 2})
    code, _, err = _dry_run(edited, capsys)
    assert code == 2 and "the plan counted stage 0's memory" in err, err


@pytest.mark.parametrize("args, words", [
    (["--sp", "2"], "--emit-config needs --out"),
    (["--sp", "2", "--zero-stage", "1", "--out", "p.json"], "Pass --zero-stage 3 (or 0)"),
    (["--sp", "2", "--offload-optimizer", "--out", "p.json"], "add --offload-params"),
])
def test_emit_config_refusals_before_planning(tmp_path, capsys, args, words):
    code = main(["plan", *PLAN, "--model", "llama2-7b", "--gpus", "2", *args, "--emit-config", str(tmp_path / "r.yaml")])
    assert code == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.parametrize("machines, processes, sp, ok", [
    (2, 8, 2, True), (2, 8, 4, True), (2, 8, 8, True), (2, 8, 16, False), (3, 12, 6, False), (2, 12, 4, False)])
def test_sequence_parallel_groups_do_not_straddle_machines(tmp_path, capsys, machines, processes, sp, ok):
    """Inside a machine (P divides its processes) or over whole machines (a multiple): NOTE [ Plan to
    launch ] rule 5; 16 over 8 processes does not divide them at all."""
    config = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_processes": processes,
              "num_machines": machines, "machine_rank": 0, "main_process_ip": "10.0.0.1", "main_process_port": 29500,
              "memo": {"sequence_parallel_size": sp}}
    path = tmp_path / "nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    code, _, err = _dry_run(str(path), capsys)
    if ok:
        assert code == 0, err
        # Groups over whole machines under the ring: a note that hybrid keeps most steps inside a machine.
        assert ("sp_backend: hybrid runs Ulysses inside each machine" in err) == (sp > processes // machines), err
    else:
        words = "does not divide num_processes" if processes % sp else "would straddle two machines"
        assert code == 2 and words in err, err
