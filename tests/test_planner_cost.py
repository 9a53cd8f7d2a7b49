"""Cost model: parameters, model states under ZeRO, FLOPs, alpha with node-shared host memory,
step time, and the Level-2 step layout. Torch-free."""

import pytest

from memo.planner.cost import GPU_PROFILES, UnknownGPU, get_gpu, layer_flops, model_state_bytes, step_time
from memo.planner.dsa import solve_layout
from memo.planner.layout import validate_layout
from memo.planner.plan import (Cluster, Options, PlanContext, finish_plan, max_fitting_seq_len, solve_level1,
                               step_allocs)
from memo.planner.presets import get_preset, model_parameters, preset_names

GIB = 1 << 30


def test_parameter_counts_match_published_models():
    assert model_parameters(get_preset("llama2-7b")) == 6_738_415_616
    assert model_parameters(get_preset("mistral-7b")) == 7_241_732_096
    assert model_parameters(get_preset("qwen2-7b")) == 7_615_616_512
    assert model_parameters(get_preset("llama3-8b")) == 8_030_261_248
    assert 6.5e9 < model_parameters(get_preset("memo-paper-7b")) < 7.0e9
    assert set(preset_names()) >= {"memo-paper-7b", "memo-paper-13b", "memo-paper-30b", "memo-paper-65b",
                                   "llama2-7b", "llama3-8b", "mistral-7b", "qwen2-7b"}


def test_model_states_16_bytes_per_parameter_and_zero_sharding():
    m = get_preset("llama2-7b")
    p = model_parameters(m)
    z0 = model_state_bytes(m, zero_stage=0, ranks=8, offload_optimizer=False)
    assert z0["device_total"] == pytest.approx(16 * p, rel=1e-6)
    assert z0["device_total"] > 80e9                      # a 7B model's states alone exceed an 80 GB GPU
    z1 = model_state_bytes(m, zero_stage=1, ranks=8, offload_optimizer=False)
    assert z1["optimizer"] == pytest.approx(12 * p / 8, rel=1e-6) and z1["gradients"] == 2 * p
    z2 = model_state_bytes(m, zero_stage=2, ranks=8, offload_optimizer=False)
    assert z2["gradients"] == pytest.approx(2 * p / 8, rel=1e-6) and z2["weights"] == 2 * p
    z3 = model_state_bytes(m, zero_stage=3, ranks=8, offload_optimizer=False)
    assert z3["weights"] == pytest.approx(2 * p / 8, rel=1e-6) and z3["zero3_gather"] > 0
    assert z3["device_total"] < z2["device_total"] < z1["device_total"] < z0["device_total"]
    off = model_state_bytes(m, zero_stage=2, ranks=8, offload_optimizer=True)
    assert off["optimizer"] == 0 and off["host"] == pytest.approx(16 * p / 8, rel=1e-6)
    with pytest.raises(ValueError, match="needs ZeRO stage 1, 2 or 3"):
        model_state_bytes(m, zero_stage=0, ranks=8, offload_optimizer=True)


def test_layer_flops_reference_formulas():
    m = get_preset("memo-paper-7b")
    s, h = 1 << 20, 4096
    f = layer_flops(m, s)
    assert f["attention"] == 2 * s * s * h                            # causal: half of 4 s^2 h
    assert f["gemm"] == 2 * s * h * 3 * h + 2 * s * h * h + 2 * s * h * 4 * h * 2
    g = layer_flops(get_preset("llama3-8b"), s)
    assert g["gemm"] == 2 * s * h * (h + 2 * 1024) + 2 * s * h * h + 2 * s * h * 14336 * 3


def test_gpu_profiles_and_overrides():
    for name in ("a800", "a100-80g", "h100", "h200"):
        assert name in GPU_PROFILES
    assert get_gpu("A800").peak_tflops == 312 and get_gpu("h100").peak_tflops == 989
    g = get_gpu("h100", host_link_Bps=12e9, memory_bytes=None)
    assert g.host_link_Bps == 12e9 and g.memory_bytes == GPU_PROFILES["h100"].memory_bytes
    with pytest.raises(UnknownGPU, match="known: a800, a100-80g, h100, h200"):
        get_gpu("v100")


def _times(alpha, **kw):
    m = get_preset("memo-paper-7b")
    args = dict(seq_len=1 << 20, micro_batch=1, sp=8, gpus=8, gpus_per_node=8, alpha=alpha,
                swap_bytes_fixed=2 * GIB, swap_bytes_other=14 * GIB, keep_layers=2, zero_stage=1,
                offload_optimizer=False)
    args.update(kw)
    return step_time(m, get_gpu("a800"), **args)


def test_step_time_attention_dominates_and_recompute_costs():
    t1, t0 = _times(1.0), _times(0.0)
    assert t0.step_time_s > t1.step_time_s and t1.layer_recompute_s == 0 and t0.layer_recompute_s > 0
    # At 1M tokens attention is over 90% of the layer's forward FLOPs; MFU is bounded by efficiency.
    f = layer_flops(get_preset("memo-paper-7b"), 1 << 20)
    assert f["attention"] / (f["attention"] + f["gemm"]) > 0.9
    assert 0.3 < t1.mfu < get_gpu("a800").attn_fwd_eff
    # A slow host link exposes the copies.
    slow = step_time(get_preset("memo-paper-7b"), get_gpu("a800", host_link_Bps=0.5e9), seq_len=1 << 20, micro_batch=1,
                     sp=8, gpus=8, gpus_per_node=8, alpha=1.0, swap_bytes_fixed=2 * GIB, swap_bytes_other=14 * GIB,
                     keep_layers=2, zero_stage=1, offload_optimizer=False)
    assert slow.copy_exposed_s > 0 and slow.step_time_s > t1.step_time_s


def _fake_profile(n_layers=4, seq=1 << 16, unit=GIB):
    model = dict(get_preset("llama2-7b"), layers=n_layers)
    model.pop("name")
    tr = lambda allocs, steps: {"steps": steps, "allocs": allocs}          # noqa: E731
    fwd = [{"id": "f0", "bytes": unit, "start": 0, "end": 4, "kind": "layer_input"},
           {"id": "f1", "bytes": 2 * unit, "start": 1, "end": 4, "kind": "other"},
           {"id": "f2", "bytes": unit, "start": 2, "end": 4, "kind": "attention_output"}]
    bwd = [{"id": "b0", "bytes": 3 * unit, "start": 0, "end": 2, "kind": "other"},
           {"id": "b1", "bytes": unit, "start": 1, "end": 3, "kind": "other"}]
    small = [{"id": "e", "bytes": unit // 4, "start": 0, "end": 1, "kind": "other"}]
    return {"model": model, "seq_len": seq, "local_seq_len": seq, "micro_batch": 1, "dtype": "bf16", "sp": 1,
            "saved_bytes": {"layer_input": unit, "attention_output": unit, "lse": 0, "other": 2 * unit,
                            "param": 0, "shared": 0},
            "forward": tr(fwd, 4), "backward": tr(bwd, 3), "embedding_forward": tr(small, 1),
            "embedding_backward": tr(small, 1), "head": tr(small, 1)}


def test_level2_step_layout_is_valid_and_counts_blocks():
    prof = _fake_profile()
    l1 = solve_level1(prof, use_mip=False)
    assert l1.forward.peak == 4 * GIB and l1.backward.peak == 4 * GIB
    states = {"weights": GIB, "gradients": GIB, "optimizer": 0, "zero3_gather": 0}
    allocs, labels = step_allocs(4, l1, states=states, shared=0, swap_bytes=3 * GIB, kept_bytes=4 * GIB, keep=2)
    assert len(labels) == 2 * 4 + 3
    lay = solve_layout(allocs, use_mip=False)
    validate_layout(allocs, lay.offsets, lay.peak)
    # Peak at the head: states (2) + kept activations of layers 2 and 3 (4 + 4) + head block
    # (0.25). Layer 3's backward (4) replaces its kept activations (they are in its block); during
    # layer 2's backward: 2 + 4 + layer 1's prefetch (3) = 9.
    assert lay.peak == lay.lower_bound == int(10.25 * GIB)
    assert {a.id for a in allocs} >= {"L0.swap_out", "L1.prefetch", "L2.kept", "L3.kept", "head"}
    assert "L2.swap_out" not in {a.id for a in allocs}


# The paper's setting: the last two layers kept, every other layer on MEMO's policy.
FIXED = Options(use_mip=False, keep_layers=2, policy="memo")


def test_alpha_divides_host_memory_among_the_gpus_of_a_node():
    prof = _fake_profile()
    l1 = solve_level1(prof, use_mip=False)

    def plan(host, gpus_per_node):
        cl = Cluster(gpus=8, sp=1, gpu=get_gpu("a800"), host_memory=host, gpus_per_node=gpus_per_node)
        return finish_plan(PlanContext(prof, cl, FIXED, l1), 1)
    # 2 swapped layers per rank; fixed 2 GiB + alpha * 2 GiB each. 8 GiB per rank -> alpha 1.
    p = plan(64 * GIB, 8)
    assert p["alpha"] == pytest.approx(1.0) and p["fits"]
    # Same node memory shared by 16 GPUs: 4 GiB per rank -> 2 layers x (2 + 2 alpha) <= 4 -> alpha 0.
    p16 = finish_plan(PlanContext(prof, Cluster(gpus=16, sp=1, gpu=get_gpu("a800"), host_memory=64 * GIB,
                                                gpus_per_node=16), FIXED, l1), 1)
    assert p16["alpha"] == pytest.approx(0.0)
    assert p16["predicted"]["host_bytes"] <= 64 * GIB
    p = plan(16 * GIB, 8)                                                    # 2 GiB per rank: too small
    assert not p["fits"] and any(r.startswith("host memory") for r in p["reasons"])


def test_max_fitting_seq_len_search():
    assert max_fitting_seq_len(lambda s: s <= 300_000, start=1 << 20, granularity=1024) == 299_008
    assert max_fitting_seq_len(lambda s: s <= 3_000_000, start=1 << 20, granularity=16384) == 2_998_272
    assert max_fitting_seq_len(lambda s: False, start=1 << 20, granularity=1024) == 0


def test_planner_imports_neither_torch_nor_the_runtime():
    import ast
    import pathlib
    root = pathlib.Path(__file__).resolve().parent.parent / "planner"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("torch", "memo", "transformers")), f"{path.name} imports {name}"
