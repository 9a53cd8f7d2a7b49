"""The planner's layer policies (NOTE [ Policy choice ] in planner/policies.py) against hand-computed
cases, and the step-time terms of "input" layers and tiling (NOTE [ Step-time model ] rules 7, 8).
Torch-free: a hand-made profile of a 4-layer llama2-7b shape at 64K tokens."""

import pytest

from memo.planner.cost import get_gpu, step_time
from memo.planner.plan import Cluster, Options, PlanContext, finish_plan, solve_level1, step_allocs
from memo.planner.presets import get_preset

GIB = 1 << 30
N = 4
# One layer on one rank: input 1 GiB, attention output 1 GiB, other saved 2 GiB; arenas 4 GiB each.
S_IN, S_ATTN, S_OTHER = GIB, GIB, 2 * GIB


def _profile():
    model = dict(get_preset("llama2-7b"), layers=N)
    model.pop("name")
    tr = lambda allocs, steps: {"steps": steps, "allocs": allocs}          # noqa: E731
    fwd = [{"id": "f0", "bytes": S_IN, "start": 0, "end": 4, "kind": "layer_input"},
           {"id": "f1", "bytes": S_OTHER, "start": 1, "end": 4, "kind": "other"},
           {"id": "f2", "bytes": S_ATTN, "start": 2, "end": 4, "kind": "attention_output"}]
    bwd = [{"id": "b0", "bytes": 3 * GIB, "start": 0, "end": 2, "kind": "other"},
           {"id": "b1", "bytes": GIB, "start": 1, "end": 3, "kind": "other"}]
    small = [{"id": "e", "bytes": GIB // 4, "start": 0, "end": 1, "kind": "other"}]
    head = [{"id": "h", "bytes": 3 * GIB, "start": 0, "end": 1, "kind": "other"}]   # LM head + loss
    return {"model": model, "seq_len": 1 << 16, "local_seq_len": 1 << 16, "micro_batch": 1, "dtype": "bf16",
            "sp": 1, "saved_bytes": {"layer_input": S_IN, "attention_output": S_ATTN, "lse": 0, "other": S_OTHER,
                                     "param": 0, "shared": 0},
            "forward": tr(fwd, 4), "backward": tr(bwd, 3), "embedding_forward": tr(small, 1),
            "embedding_backward": tr(small, 1), "head": tr(head, 1), "tile_tokens": None, "mlp_saved_bytes": 0}


PROFILE = _profile()
LEVEL1 = solve_level1(PROFILE, use_mip=False)


def _plan(host_per_rank, *, keep=0, memory=None, alpha="auto", policy="auto", grads_persist=False):
    # A host link fast enough that every copy hides: the choice is between recomputing and host bytes.
    gpu = get_gpu("h100", host_link_Bps=1e12, memory_bytes=memory)
    cl = Cluster(gpus=1, sp=1, gpu=gpu, host_memory=host_per_rank, gpus_per_node=1, reserve_bytes=0)
    opts = Options(use_mip=False, keep_layers=keep, swap_ratio=alpha, policy=policy, grads_persist=grads_persist)
    return finish_plan(PlanContext(PROFILE, cl, opts, LEVEL1), 1)


def test_host_that_holds_everything_runs_memo_everywhere_at_alpha_1():
    p = _plan(N * (S_IN + S_ATTN + S_OTHER))                 # 16 GiB: every layer's whole saved set
    assert p["fits"] and p["layer_policies"] == ["memo"] * N and p["alpha"] == pytest.approx(1.0)
    assert p["predicted"]["host_bytes_per_rank"] == N * (S_IN + S_ATTN + S_OTHER)
    # The least host memory this job needs: every layer keeping only its input.
    assert p["predicted"]["host_bytes_min_per_rank"] == N * S_IN
    assert p["predicted"]["host_bytes_min_policies"] == ["input"] * N


def test_host_that_holds_only_inputs_runs_input_everywhere():
    p = _plan(N * S_IN)                                       # 4 GiB
    assert p["fits"] and p["layer_policies"] == ["input"] * N
    assert p["predicted"]["host_bytes_per_rank"] == N * S_IN
    t = p["predicted"]["times"]
    assert t["input_layers"] == N and t["recompute_per_step_s"] == pytest.approx(
        N * t["layer_input_recompute_s"] + N * t["mlp_recompute_s"])


def test_host_in_between_runs_the_fewest_input_layers_that_are_fastest():
    # 6 GiB: k "input" layers (1 GiB) + (4 - k) "memo" layers (2 + 2 alpha GiB) <= 6 needs k >= 2.
    # k = 2: alpha 0, recompute 2 (g + a) + 2 g; k = 3: alpha 0.5, 3 (g + a) + 0.5 g. Attention's
    # forward a (51 ms here) > 0.5 g (20 ms), so k = 2 (see the times asserted below).
    p = _plan(6 * GIB)
    assert p["fits"] and p["layer_policies"] == ["input", "input", "memo", "memo"]
    assert p["alpha"] == pytest.approx(0.0) and p["predicted"]["host_bytes_per_rank"] == 6 * GIB
    t = p["predicted"]["times"]
    g, a = t["layer_recompute_s"], t["layer_input_recompute_s"] - t["layer_recompute_s"]
    assert a > 0.5 * g > 0
    assert t["recompute_per_step_s"] == pytest.approx(2 * (g + a) + 2 * g)
    three = _plan(6 * GIB, alpha=0.5, policy="input")         # every swapped layer "input": k = 4, for contrast
    assert three["predicted"]["step_time_s"] > p["predicted"]["step_time_s"]
    # Too little host for even the inputs: does not fit, and says the host is why.
    p = _plan(3 * GIB)
    assert not p["fits"] and any(r.startswith("host memory") for r in p["reasons"])


def test_device_bound_job_keeps_no_layer():
    # With room on the device, keeping layers saves their recompute (host 8 GiB: alpha 0 at keep 0).
    roomy = _plan(8 * GIB, keep=None)
    assert roomy["fits"] and roomy["keep_layers"] > 0 and roomy["keep_layers_chosen"]
    keep0 = _plan(8 * GIB, keep=0)
    assert keep0["predicted"]["step_time_s"] > roomy["predicted"]["step_time_s"]
    # Every layer "input", keep 0: a layer's backward step holds max(forward 4 + output gradient 1,
    # backward 4) + the next prefetch 1 = 6 GiB; keeping the last layer puts its 4 GiB beside the
    # 3 GiB head (7). Gradients live for the whole step here, so model states add the same to both.
    states = keep0["model_states"]["device_total"]
    memory = states + 6 * GIB + GIB // 2
    tight = _plan(8 * GIB, keep=None, memory=memory, grads_persist=True)
    assert tight["fits"] and tight["keep_layers"] == 0 and tight["layer_policies"] == ["input"] * N
    assert tight["predicted"]["activation_peak_bytes"] == 6 * GIB
    assert _plan(8 * GIB, keep=1, memory=memory, policy="input", grads_persist=True)["fits"] is False


def test_forced_policy_and_keep_are_kept():
    p = _plan(16 * GIB, keep=2, policy="input")
    assert p["layer_policies"] == ["input", "input", "kept", "kept"] and not p["keep_layers_chosen"]
    p = _plan(16 * GIB, keep=1, policy="memo", alpha=0.25)
    assert p["layer_policies"] == ["memo"] * 3 + ["kept"] and p["alpha"] == 0.25


def test_input_layer_blocks_in_level2():
    states = {"weights": GIB, "gradients": GIB, "optimizer": 0, "zero3_gather": 0}
    allocs, _ = step_allocs(N, LEVEL1, states=states, shared=0, swap_bytes=3 * GIB, kept_bytes=4 * GIB,
                            policies=["input", "memo", "memo", "kept"], input_bytes=S_IN,
                            input_bwd_bytes=5 * GIB, recompute_bytes=GIB)
    by_id = {a.id: a.bytes for a in allocs}
    # NOTE [ Level-2 step timeline ] rule 8: input only on the host side, the forward again in backward.
    assert by_id["L0.swap_out"] == by_id["L0.prefetch"] == S_IN and by_id["L0.bwd"] == 5 * GIB
    assert "L0.recompute" not in by_id and by_id["L1.recompute"] == GIB and by_id["L1.swap_out"] == 3 * GIB
    assert by_id["L3.kept"] == 4 * GIB and "L3.swap_out" not in by_id


def _times(**kw):
    args = dict(seq_len=1 << 20, micro_batch=1, sp=8, gpus=8, gpus_per_node=8, alpha=1.0,
                swap_bytes_fixed=2 * GIB, swap_bytes_other=8 * GIB, keep_layers=0, zero_stage=3,
                offload_optimizer=False)
    args.update(kw)
    return step_time(get_preset("llama3-8b"), get_gpu("h100"), **args)


def test_input_layers_pay_the_attention_forward_and_its_ring_again():
    base, one = _times(), _times(input_layers=1, swap_bytes_input=GIB)
    assert one.layer_input_recompute_s == pytest.approx(base.layer_forward_s + base.sp_comm_fwd_s)
    assert one.step_time_s - base.step_time_s == pytest.approx(one.layer_input_recompute_s)
    assert one.input_layers == 1 and one.memo_layers == 31


def test_tiled_mlp_adds_one_mlp_forward_per_layer():
    # Everything kept (no copies, no recompute): the only difference is the tiled backward's MLP forward.
    mlp_saved = 12 * GIB
    untiled = _times(keep_layers=32, swap_bytes_other=8 * GIB + mlp_saved)
    tiled = _times(keep_layers=32, tiled=True, mlp_saved_bytes=mlp_saved)
    gpu, m = get_gpu("h100"), get_preset("llama3-8b")
    mlp_flops = 2 * (1 << 20) * m["hidden"] * m["intermediate"] * 3
    want = mlp_flops / 8 / (gpu.peak_tflops * 1e12 * gpu.gemm_eff) + gpu.elementwise_passes * mlp_saved / gpu.hbm_Bps
    assert tiled.mlp_recompute_s == pytest.approx(want) and untiled.mlp_recompute_s == 0
    assert tiled.step_time_s - untiled.step_time_s == pytest.approx(32 * want)
    assert tiled.mfu < untiled.mfu


def test_recomputes_skip_a_tiled_mlp_whose_output_nothing_saves():
    """Cost NOTE rule 8 / NOTE [ Token tiling ] rule 7: with ``mlp_output_unused`` a "memo" layer's
    token-wise recompute and an "input" layer's forward again leave the tiled MLP's time out."""
    kw = dict(alpha=0.25, input_layers=4, swap_bytes_input=GIB, tiled=True, mlp_saved_bytes=12 * GIB)
    runs, skips = _times(**kw), _times(mlp_output_unused=True, **kw)
    mlp = runs.mlp_recompute_s
    assert mlp > 0 and skips.mlp_recompute_s == mlp
    assert skips.layer_recompute_s == pytest.approx(runs.layer_recompute_s - 0.75 * mlp)
    assert skips.layer_input_recompute_s == pytest.approx(runs.layer_input_recompute_s - mlp)
    assert runs.step_time_s - skips.step_time_s == pytest.approx(28 * 0.75 * mlp + 4 * mlp)


def test_the_profile_says_whether_recompute_skips_the_mlp():
    """The profiler applies the executor's test to the traced layer: Llama's MLP output goes to a residual
    add (skipped); untiled there is no tiled MLP to skip."""
    from memo.profile import load_model, profile_model
    model = load_model("llama3-8b")
    assert profile_model(model, seq_len=16384, tile_tokens=4096).mlp_output_unused
    assert not profile_model(model, seq_len=16384, tile_tokens=None).mlp_output_unused
