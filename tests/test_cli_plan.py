"""`memo plan`: --json schema, plan files, plots, and exit code 2 on every kind of bad input."""

import json
import re

import pytest

from memo.cli.main import main
from memo.planner.layout import Alloc, validate_layout
from memo.planner.planfile import check_plan_matches, load_plan

FAST = ["--time-limit", "5"]


def _run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_schema_for_the_paper_7b_at_1m(capsys, tmp_path):
    out_path = tmp_path / "plan.json"
    png = tmp_path / "plan.png"
    code, out, err = _run(capsys, "--model", "memo-paper-7b", "--seq-len", "1M", "--micro-batch", "1", "--gpus", "8",
                          "--sp", "8", "--gpu", "a800", "--host-memory", "2TiB", "--pcie", "25GB/s", *FAST,
                          "--json", "--out", str(out_path), "--plot", str(png))
    assert code == 0, err
    plan = json.loads(out)
    assert 0.0 <= plan["alpha"] <= 1.0 and plan["fits"] is True
    pred = plan["predicted"]
    for key in ("step_time_s", "mfu", "device_peak_bytes", "host_bytes"):
        assert isinstance(pred[key], (int, float)) and pred[key] > 0
    assert 0 < pred["mfu"] < 1 and pred["device_peak_bytes"] <= 80 * 2**30
    assert pred["host_bytes"] <= 2 * 2**40
    for part in ("forward", "backward"):
        lay = plan["layer"][part]
        for key in ("peak_bytes", "lower_bound_bytes", "solve_s", "tensors"):
            assert key in lay
        assert lay["lower_bound_bytes"] <= lay["peak_bytes"]
        allocs = [Alloc(t["id"], t["bytes"], t["start"], t["end"]) for t in lay["tensors"]]
        validate_layout(allocs, {t["id"]: t["offset"] for t in lay["tensors"]}, lay["peak_bytes"])
        assert set(lay["tensors"][0]) >= {"id", "bytes", "start", "end", "offset"}
    assert plan["step"]["lower_bound_bytes"] <= plan["step"]["peak_bytes"]
    # ZeRO stage not given: the lowest that fits is chosen, and said so.
    assert plan["zero_stage_chosen"] is True
    assert all(not t["fits"] for t in plan["stages_tried"][:-1])
    assert f"--zero-stage not given: chose ZeRO stage {plan['zero_stage']}, the lowest that fits" in err
    # The plan file loads and matches the job it was made for.
    saved = load_plan(str(out_path))
    check_plan_matches(saved, model=plan["model"], seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_human_report(capsys):
    code, out, err = _run(capsys, "--model", "llama3-8b", "--seq-len", "256K", "--gpus", "8", "--gpu", "h100",
                          "--host-memory", "1TiB", "--zero-stage", "3", "--max-seq-len", *FAST)
    assert code == 0, err
    for text in ("memory per GPU", "device peak", "alpha:", "predicted: step", "MFU", "max length:", "fits:      yes",
                 "layer forward", "stage 3", "layers:    ", "MLP tile", "host, per node (least this job needs)",
                 "of which activations (no model states)", "recompute per step", "limited by "):
        assert text in out, text
    assert "profiled one llama layer" in err


def test_help_names_the_required_flags(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    group = out[out.index("required (unless --from-plan):"):]
    group = group.split("\n\n")[0]
    for flag in ("--model", "--seq-len", "--host-memory"):
        assert flag in group
    for flag in ("--tile-tokens", "--keep-layers", "--policy"):
        assert flag in out and flag not in group


M7 = ["--model", "memo-paper-7b", "--host-memory", "2TiB"]


@pytest.mark.parametrize("argv,match", [
    (["--model", "gpt-9000", "--seq-len", "1M", "--host-memory", "2TiB"],
     "unknown model preset 'gpt-9000'; known presets: memo-paper-7b"),
    (M7 + ["--seq-len", "1000001", "--sp", "8"], "cannot be split by the zigzag layout.*use 1000000 or 1000016"),
    (M7 + ["--seq-len", "lots"], "cannot read count 'lots'"),
    (["--model", "memo-paper-7b", "--seq-len", "1M", "--host-memory", "2 tibbles"], "cannot read size"),
    (M7 + ["--seq-len", "1M", "--gpu", "v100"], "unknown GPU 'v100'"),
    (M7 + ["--seq-len", "1M", "--gpus", "8", "--sp", "3"], "not a multiple of --sp 3"),
    (M7 + ["--seq-len", "1M", "--swap-ratio", "1.5"], "outside \\[0, 1\\]"),
    (M7 + ["--seq-len", "1M", "--zero-stage", "0", "--offload-optimizer"], "needs ZeRO stage 1, 2 or 3"),
    (["--model", "memo-paper-7b", "--seq-len", "1M"], "--host-memory is required"),
    (["--model", "memo-paper-7b", "--host-memory", "2TiB"], "--seq-len is required"),
    (M7 + ["--seq-len", "1M", "--tile-tokens", "-5"], "--tile-tokens '-5' is not auto, none or a token count"),
    (M7 + ["--seq-len", "1M", "--keep-layers", "-1"], "--keep-layers -1 must be >= 0"),
    (M7 + ["--seq-len", "1M", "--sp-backend", "tree"],
     "--sp-backend 'tree' is not one of ring, ulysses, hybrid; pass one of those"),
    (["--model", "llama3-8b", "--host-memory", "2TiB", "--seq-len", "1M", "--gpus", "16", "--sp", "16",
      "--sp-backend", "ulysses"],
     "8 kv heads, not divisible by 16; use --sp-backend ring, which has no head-count limit"),
    (["--model", "memo-paper-30b", "--host-memory", "2TiB", "--seq-len", "1M", "--gpus", "16", "--sp", "16",
      "--sp-backend", "ulysses"], "56 heads and 56 kv heads, not divisible by 16; use --sp-backend ring"),
    (M7 + ["--seq-len", "768K", "--gpus", "12", "--sp", "12", "--sp-backend", "hybrid"],
     "Ulysses over the 8 GPUs of a node .* 8 does not divide --sp 12; .* or use --sp-backend ring"),
    (["--model", "llama3-8b", "--host-memory", "2TiB", "--seq-len", "1M", "--gpus", "32", "--sp", "32",
      "--gpus-per-node", "16", "--sp-backend", "hybrid"],
     "= 16 ranks, but the model has 8 kv heads.*--sp-backend ring"),
])
def test_bad_input_exits_2_with_the_fix(capsys, argv, match):
    code, out, err = _run(capsys, *argv, *FAST)
    assert code == 2
    assert err.startswith("memo.plan: ")
    assert re.search(match, err), err


def test_config_json_missing_fields_exits_2(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32}))
    code, out, err = _run(capsys, "--model", str(cfg), "--seq-len", "1M", "--host-memory", "2TiB", *FAST)
    assert code == 2 and "lacks num_hidden_layers, intermediate_size, vocab_size" in err


def test_config_json_path_works(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 1024, "num_hidden_layers": 4,
                               "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 2,
                               "vocab_size": 32000}))
    code, out, err = _run(capsys, "--model", str(cfg), "--seq-len", "64K", "--gpus", "2", "--host-memory", "256GiB",
                          "--json", *FAST)
    assert code == 0, err
    assert json.loads(out)["model"]["kv_heads"] == 2


def test_job_that_does_not_fit_says_the_smallest_change(capsys):
    code, out, err = _run(capsys, "--model", "llama2-7b", "--seq-len", "1M", "--gpus", "1", "--gpu", "a800",
                          "--host-memory", "256GiB", "--json", "--no-mip")
    assert code == 2
    plan = json.loads(out)
    assert plan["fits"] is False and plan["reasons"]
    assert "memo.plan: the job does not fit" in err
    assert "--gpus 8 --sp 8" in err
    assert plan["suggestions"]
    # 16 bytes per parameter of a 7B model exceed one 80 GB GPU: the length search finds the
    # longest length with the optimizer states on the host, and says so.
    search = plan["max_seq_len_search"]
    assert plan["max_seq_len"] > 0 and search["options"]["offload_optimizer"] is True
    assert search["limit"]["kind"] and search["limit"]["seq_len"] == plan["max_seq_len"] + search["granularity"]


def test_corrupt_plan_file_exits_2(capsys, tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"memo_plan_version": 1, "model": {"hidden": 40')
    code, out, err = _run(capsys, "--from-plan", str(bad))
    assert code == 2 and "not valid JSON" in err and "memo plan" in err
    code, out, err = _run(capsys, "--from-plan", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read plan file" in err


def test_unwritable_output_exits_2(capsys, tmp_path):
    code, out, err = _run(capsys, "--model", "memo-paper-7b", "--seq-len", "64K", "--host-memory", "2TiB", *FAST,
                          "--out", str(tmp_path / "no" / "such" / "plan.json"))
    assert code == 2 and "cannot write the plan" in err


def test_unsupported_layer_exits_2(capsys, tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 256, "num_hidden_layers": 2,
                               "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 1000}))
    code, out, err = _run(capsys, "--model", str(cfg), "--seq-len", "4K", "--gpus", "1", "--host-memory", "64GiB",
                          *FAST)
    assert code == 2 and "cannot run a mixtral decoder layer under FakeTensorMode" in err
    assert err.rstrip().endswith("use one of those or a preset")


def test_tiny_llama_activation_peak_tiled_and_untiled(capsys, tmp_path):
    """Issue 14 item 4's planner side: a Llama whose MLP is 8x its hidden size at 8K tokens, fp32,
    swap ratio 0, no kept layer, tile 1024 and untiled; MEMO's policy everywhere, the default with a
    given --swap-ratio (what a run without a plan does at a fixed ratio). ``predicted.activation_live_peak_bytes`` leaves out weights,
    gradients and optimizer states, and counts live bytes as a count of live storages does."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 256, "intermediate_size": 2048,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 1024}))
    peaks = {}
    for tile in ("1024", "none"):
        code, out, err = _run(capsys, "--model", str(cfg), "--seq-len", "8192", "--gpus", "1", "--sp", "1",
                              "--dtype", "fp32", "--swap-ratio", "0", "--keep-layers", "0", "--tile-tokens", tile,
                              "--host-memory", "64GiB", "--json", "--no-mip")   # --policy: memo at a given ratio
        assert code == 0, err
        plan = json.loads(out)
        assert plan["layer_policies"] == ["memo", "memo"] and plan["alpha"] == 0.0 and plan["keep_layers"] == 0
        assert plan["tile_tokens"] == (1024 if tile == "1024" else None)
        pr = plan["predicted"]
        states = plan["model_states"]["device_total"]
        assert pr["activation_live_peak_bytes"] <= pr["activation_peak_bytes"] <= plan["step"]["peak_bytes"]
        assert plan["step"]["peak_bytes"] - pr["activation_peak_bytes"] <= states
        peaks[tile] = pr["activation_live_peak_bytes"]
    # The MLP's intermediates (8x hidden) one tile at a time: well under half the untiled peak.
    assert peaks["1024"] < 0.45 * peaks["none"]


def test_host_bound_job_names_the_least_host_memory(capsys):
    """8 GiB of host per rank cannot hold 28 layer inputs of 1 GiB at 1M tokens over 8 ranks: the
    report names the host as the limit, the least host memory that runs the job, and the longest
    length this host holds."""
    code, out, err = _run(capsys, "--model", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--gpu", "h100",
                          "--host-memory", "64GiB", "--json", "--no-mip")
    assert code == 2
    plan = json.loads(out)
    assert not plan["fits"] and plan["reasons"][0].startswith("host memory")
    # Least host: every swapped layer "input" (1 GiB each per rank), the most kept layers the GPU holds.
    pr = plan["predicted"]
    kept = pr["host_bytes_min_policies"].count("kept")
    assert pr["host_bytes_min"] == 8 * (32 - kept) * (1 << 30) and kept >= 1
    search = plan["max_seq_len_search"]
    assert search["limit"]["kind"] == "host memory" and 0 < plan["max_seq_len"] < 1 << 20
    assert "--host-memory" in err


def test_given_swap_ratio_plans_the_run_without_a_plan(capsys, tmp_path):
    """--swap-ratio N describes what the runtime runs at a fixed ratio without a plan: "memo" on every
    swapped layer and MemoConfig's default kept layers; --swap-ratio auto lets the planner choose."""
    from memo.config import MemoConfig
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "vocab_size": 128}))
    common = ["--model", str(cfg), "--seq-len", "64", "--gpus", "1", "--gpu", "a100-80g", "--host-memory", "64GiB",
              "--dtype", "fp32", "--json", "--no-mip"]
    keep = MemoConfig.keep_last_layers
    code, out, err = _run(capsys, *common, "--swap-ratio", "0.25")
    plan = json.loads(out)
    assert plan["layer_policies"] == ["memo"] * (4 - keep) + ["kept"] * keep and not plan["keep_layers_chosen"]
    code, out, err = _run(capsys, *common)
    plan = json.loads(out)
    assert plan["keep_layers_chosen"] and plan["layer_policies"] == ["kept"] * 4   # everything fits: keep all
