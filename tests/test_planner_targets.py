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
def eight_gpus_8m(capsys_module):
    """8M tokens on 8 H100s, 2 TiB per node, default flags (MIP allowed): does not fit."""
    return _plan(capsys_module, "--model", "llama3-8b", "--seq-len", "8M", "--gpus", "8", "--sp", "8",
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
                 "--host-memory", "1TiB", "--no-mip", "--max-seq-len")


def test_llama3_8b_on_8_h100_at_1m(capsys):
    code, plan, err, _ = _plan(capsys, "--model", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--sp", "8",
                               "--host-memory", "2TiB", "--no-mip")
    assert code == 0 and plan["fits"], err
    assert plan["tile_tokens"] == 9216 and len(plan["layer_policies"]) == 32
    # With the norm tiled with the MLP (NOTE [ Token tiling ] rule 8) the host holds every layer's
    # whole saved set: alpha 1, nothing recomputed but the tiled MLP.
    assert plan["alpha"] == 1.0 and plan["predicted"]["host_bytes"] <= 2 << 40
    assert plan["predicted"]["host_bytes_min"] < 0.2 * (2 << 40)       # the least it needs: ~232 GiB
    assert plan["predicted"]["mfu"] >= 0.34


@pytest.mark.xfail(strict=True, reason="the attention kernels' measured H100 rates (cuDNN backward at 31% of "
                                       "peak) cap the model's MFU at 35.3% at 1M tokens; 45% needs ~42.5%")
def test_target_45_percent_mfu_at_1m(capsys):
    code, plan, err, _ = _plan(capsys, "--model", "llama3-8b", "--seq-len", "1M", "--gpus", "8", "--sp", "8",
                               "--host-memory", "2TiB", "--no-mip")
    assert plan["predicted"]["mfu"] >= 0.45


def test_job_that_does_not_fit_is_answered_within_a_minute(eight_gpus_8m):
    code, plan, err, elapsed = eight_gpus_8m
    assert code == 2 and not plan["fits"] and elapsed < 60, elapsed
    assert plan["mip"].startswith("skipped")
    search = plan["max_seq_len_search"]
    assert search["lengths_tried"] <= 12
    # Past ALST's published 3.7M on 8 H100s, reached with ZeRO-3, optimizer offload, every layer "input".
    assert plan["max_seq_len"] >= 4 << 20
    assert search["options"]["zero_stage"] == 3 and search["options"]["offload_optimizer"]
    assert search["options"]["policy_counts"]["input"] >= 31
    # The final norm runs chunk by chunk inside the chunked loss (NOTE [ Chunked loss with the final norm ]):
    # 4,612,096 tokens before it.
    assert plan["max_seq_len"] >= 5_000_000
    assert search["limit"]["kind"] == "device arena"
    assert "Smallest changes that fit" in err and f"--seq-len {plan['max_seq_len']}" in err


def test_target_4m_on_8_h100(capsys):
    """The issue's job (--offload-optimizer) at 4M: fits, with the tiled norm + MLP (NOTE [ Token tiling ]
    rule 8), ZeRO-3 and every layer keeping only its input on the host."""
    code, plan, err, _ = _plan(capsys, "--model", "llama3-8b", "--seq-len", "4M", "--gpus", "8", "--sp", "8",
                               "--host-memory", "2TiB", "--offload-optimizer", "--no-mip")
    assert code == 0 and plan["fits"], err
    assert plan["zero_stage"] in (2, 3) and plan["tile_tokens"] == 9216   # ZeRO-2 since the fused final norm
    assert set(plan["layer_policies"]) <= {"input", "kept"} and plan["layer_policies"].count("input") >= 31
    assert plan["predicted"]["device_peak_bytes"] <= 80 * GIB and plan["predicted"]["mfu"] >= 0.28


def test_llama3_8b_on_1_h100(one_gpu_512k):
    code, plan, err, _ = one_gpu_512k
    search = plan["max_seq_len_search"]
    assert plan["max_seq_len"] >= 300_000 and search["options"]["offload_optimizer"]
    # With the weights on the host the model states are a gather buffer and a gradient buffer (3 GiB).
    assert search["limit"]["kind"] == "device arena" and search["limit"]["model_state_bytes"] < 4 * GIB


def test_target_500k_on_1_h100(one_gpu_512k):
    """ALST's 500K on one H100, reached as ALST does: ZeRO-3 with the weights and the optimizer on the host
    (NOTE [ Parameter offload ] in planner/cost.py); without them 8B weights + gradients (30 GiB) stop it
    at 417,792. Next limit: the LM head + loss block."""
    code, plan, err, _ = one_gpu_512k
    search = plan["max_seq_len_search"]
    assert plan["max_seq_len"] >= 500_000
    o = search["options"]
    assert o["zero_stage"] == 3 and o["offload_optimizer"] and o["offload_params"]
    assert o["device_peak_bytes"] <= 80 * GIB and o["mfu"] >= 0.30
    assert search["limit"]["offload_params"] and "--offload-optimizer --offload-params" in err


def test_target_1m_tinyllama_on_1_h100(tinyllama_1m):
    code, plan, err, _ = tinyllama_1m
    # 1M fits as asked (no offload) since the final norm runs inside the chunked loss; the longest
    # (weights and optimizer offloaded) is past 1.3M, 1,187,840 before.
    assert code == 0 and plan["fits"], err
    search = plan["max_seq_len_search"]
    assert plan["max_seq_len"] >= 1_300_000 and search["options"]["offload_optimizer"]
    assert search["limit"]["kind"] == "device arena"
