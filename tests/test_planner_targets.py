"""Issue 14's length and MFU targets, from `memo plan --json` (bf16, --gpu h100), as the planner
models the runtime today (tiled MLP, layer policies, ZeRO / optimizer offload searched).

What the model predicts is asserted as a floor (a change that loses length fails here); the
targets it does not reach are strict xfails naming the term that blocks them (docs/planner.md,
"Targets"), so that reaching one turns the test red until this file is updated.
"""

import json
import time

import pytest

from memo.cli.main import main

GIB = 1 << 30
TINYLLAMA = {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 22, "intermediate_size": 5632,
             "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000}


def _plan(capsys, *argv):
    t0 = time.perf_counter()
    code = main(["plan", "--gpu", "h100", "--json", *argv])
    elapsed = time.perf_counter() - t0
    out, err = capsys.readouterr()
    return code, json.loads(out), err, elapsed


@pytest.fixture(scope="module")
def capsys_module(request):
    # pytest's capsys is function-scoped; a module fixture captures through its own capture manager.
    capman = request.config.pluginmanager.getplugin("capturemanager")

    class Cap:
        def readouterr(self):
            return capman.read_global_capture()
    return Cap()


@pytest.fixture(scope="module")
def eight_gpus_4m(capsys_module):
    """4M tokens on 8 H100s, 2 TiB per node, default flags (MIP allowed): does not fit today."""
    return _plan(capsys_module, "--model", "llama3-8b", "--seq-len", "4M", "--gpus", "8", "--sp", "8",
                 "--host-memory", "2TiB")


@pytest.fixture(scope="module")
def one_gpu_512k(capsys_module):
    return _plan(capsys_module, "--model", "llama3-8b", "--seq-len", "512K", "--gpus", "1", "--sp", "1",
                 "--host-memory", "1TiB", "--no-mip")


@pytest.fixture(scope="module")
def tinyllama_1m(capsys_module, tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "config.json"
    path.write_text(json.dumps(TINYLLAMA))
    return _plan(capsys_module, "--model", str(path), "--seq-len", "1M", "--gpus", "1", "--sp", "1",
                 "--host-memory", "1TiB", "--no-mip")


def test_llama3_8b_on_8_h100_at_1m(capsys):
    code, plan, err, _ = _plan(capsys, "--model", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--sp", "8",
                               "--host-memory", "2TiB", "--no-mip")
    assert code == 0 and plan["fits"], err
    assert plan["tile_tokens"] == 9216 and len(plan["layer_policies"]) == 32
    # The host does not hold every layer's whole saved set: alpha below 1, filled to the budget.
    assert 0 < plan["alpha"] < 1 and plan["predicted"]["host_bytes"] <= 2 << 40
    assert plan["predicted"]["host_bytes_min"] < 0.2 * (2 << 40)       # the least it needs: ~232 GiB
    assert plan["predicted"]["mfu"] >= 0.34


@pytest.mark.xfail(strict=True, reason="the attention kernels' measured H100 rates (cuDNN backward at 31% of "
                                       "peak) cap the model's MFU at 35.3% at 1M tokens; 45% needs ~42.5%")
def test_target_45_percent_mfu_at_1m(capsys):
    code, plan, err, _ = _plan(capsys, "--model", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--sp", "8",
                               "--host-memory", "2TiB", "--no-mip")
    assert plan["predicted"]["mfu"] >= 0.45


def test_job_that_does_not_fit_is_answered_within_a_minute(eight_gpus_4m):
    code, plan, err, elapsed = eight_gpus_4m
    assert code == 2 and not plan["fits"] and elapsed < 60, elapsed
    assert plan["mip"].startswith("skipped")
    search = plan["max_seq_len_search"]
    assert search["lengths_tried"] <= 12
    # ALST's published 3.7M on 8 H100s, reached with ZeRO-3, optimizer offload, every layer "input".
    assert plan["max_seq_len"] >= 3_700_000
    assert search["options"]["zero_stage"] == 3 and search["options"]["offload_optimizer"]
    assert search["options"]["policy_counts"]["input"] == 32
    assert search["limit"]["kind"] == "device arena" and search["limit"]["layer_arena_bytes"] > 60 * GIB
    assert "Smallest changes that fit" in err and f"--seq-len {plan['max_seq_len']}" in err


@pytest.mark.xfail(strict=True, reason="the layer's backward arena (HF RMSNorm's fp32 tensors over the whole "
                                       "sequence: 32 GiB saved + 40 GiB temporaries at 512K tokens per rank) "
                                       "stops the length at 3.74M")
def test_target_4m_on_8_h100(eight_gpus_4m):
    assert eight_gpus_4m[1]["max_seq_len"] >= 4 << 20


def test_llama3_8b_on_1_h100(one_gpu_512k):
    code, plan, err, _ = one_gpu_512k
    search = plan["max_seq_len_search"]
    assert plan["max_seq_len"] >= 300_000 and search["options"]["offload_optimizer"]
    # Weights and gradients of 8B parameters on one GPU (no sharding) are 30 GiB of it.
    assert search["limit"]["kind"] == "device arena" and search["limit"]["model_state_bytes"] > 29 * GIB


@pytest.mark.xfail(strict=True, reason="weights + gradients (30 GiB on one GPU) + the layer's backward arena")
def test_target_500k_on_1_h100(one_gpu_512k):
    assert one_gpu_512k[1]["max_seq_len"] >= 500_000


def test_tinyllama_on_1_h100(tinyllama_1m):
    code, plan, err, _ = tinyllama_1m
    assert plan["max_seq_len"] >= 950_000
    assert plan["max_seq_len_search"]["limit"]["kind"] == "device arena"


@pytest.mark.xfail(strict=True, reason="the layer's backward arena (HF RMSNorm's fp32 tensors) at 1M tokens")
def test_target_1m_tinyllama_on_1_h100(tinyllama_1m):
    assert tinyllama_1m[1]["max_seq_len"] >= 1 << 20
