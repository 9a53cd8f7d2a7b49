"""Sequence-parallel backends in the planner: ring, Ulysses and hybrid communication (bytes and
exposed time, checked by hand), their ordering, the Level-1 buffers each adds, and ``memo plan
--sp-backend`` end to end. See NOTE [ SP communication model ] and NOTE [ SP buffers in Level 1 ]."""

import json

import pytest

from memo.cli.main import main
from memo.planner.cost import SPBackendError, SPDegrees, get_gpu, sp_comm, sp_degrees, step_time
from memo.planner.layout import live_bytes_over_time
from memo.planner.plan import (Cluster, Options, PlanContext, finish_plan, layer_allocs, solve_level1,
                               ulysses_buffer_bytes)
from memo.planner.planfile import PlanMismatch, check_plan_matches, load_plan, plan_sp_backend
from memo.planner.presets import get_preset

TINY = {"model_type": "llama", "layers": 2, "hidden": 32, "intermediate": 64, "heads": 4, "kv_heads": 2,
        "head_dim": 8, "vocab": 100}
GPU = get_gpu("a800", interconnect_Bps=1e9, inter_node_Bps=1e8)


def _comm(model=TINY, **kw):
    args = dict(seq_len=64, micro_batch=1, sp=2, gpus_per_node=8, backend="ulysses", dtype="bf16")
    args.update(kw)
    return sp_comm(model, GPU, **args)


def test_ulysses_all_to_all_by_hand():
    # s = 64 / 2 = 32 tokens, h = 4, kv = 2, d = 8, bf16. Each rank sends (P - 1) / P = 1/2 of:
    # forward q, k, v (4 + 2 + 2) * 8 * 2 = 128 B/token, out 4 * 8 * 2 = 64, LSE 4 * 4 = 16 -> 208 B/token;
    # backward q, k, v, out, dout (4 + 2 + 2 + 4 + 4) * 16 = 256, LSE 16, dq, dk, dv (4 + 2 + 2) * 16 = 128 -> 400.
    c = _comm()
    assert (c.ulysses_degree, c.ring_degree) == (2, 1)
    assert c.a2a_fwd_bytes == 32 * 208 / 2 == 3328
    assert c.a2a_bwd_bytes == 32 * 400 / 2 == 6400
    assert c.a2a_fwd_s == pytest.approx(3328 / 1e9) and c.a2a_bwd_s == pytest.approx(6400 / 1e9)
    # Never overlapped: attention time does not hide any of it.
    hidden = _comm(attn_fwd_s=1.0, attn_bwd_s=1.0)
    assert hidden.fwd_exposed_s == c.fwd_exposed_s == pytest.approx(3328 / 1e9)
    assert hidden.bwd_exposed_s == pytest.approx(6400 / 1e9)
    assert c.ring_fwd_bytes == c.ring_bwd_bytes == c.ring_fwd_exposed_s == 0


def test_ulysses_time_grows_with_the_bytes():
    base = _comm()
    longer = _comm(seq_len=128)
    assert longer.a2a_fwd_bytes == 2 * base.a2a_fwd_bytes and longer.a2a_bwd_s == pytest.approx(2 * base.a2a_bwd_s)
    # Two more kv heads: k and v of 2 * 8 * 2 B/token more each way in the forward (2 x 32 B), and
    # k, v gathered plus dk, dv back in the backward (4 x 32 B), for 32 tokens, half of it sent.
    wider = _comm(model=dict(TINY, kv_heads=4))
    assert wider.a2a_fwd_bytes - base.a2a_fwd_bytes == 32 * 64 / 2
    assert wider.a2a_bwd_bytes - base.a2a_bwd_bytes == 32 * 128 / 2
    assert wider.a2a_fwd_s > base.a2a_fwd_s
    # More ranks: each sends a larger share ((U - 1) / U) of a smaller local sequence.
    four = _comm(model=dict(TINY, kv_heads=4), sp=4)
    assert four.a2a_fwd_bytes == 16 * (4 + 8) * 16 * 3 / 4 + 16 * (4 * 16 + 16) * 3 / 4


def test_ulysses_across_nodes_is_limited_by_the_inter_node_link():
    # 4 ranks, 2 per node: of what a rank sends, 1/3 stays in its node, 2/3 crosses (at 1e8 B/s).
    c = _comm(model=dict(TINY, kv_heads=4), sp=4, gpus_per_node=2)
    assert c.a2a_fwd_s == pytest.approx(c.a2a_fwd_bytes * 2 / 3 / 1e8)


def test_ring_by_hand():
    # Block of k and v: 2 * 32 tokens * 2 kv heads * 8 * 2 B = 2048 B; dk + dv in fp32: 4096 B.
    c = _comm(backend="ring")
    assert (c.ulysses_degree, c.ring_degree) == (1, 2)
    assert c.ring_fwd_bytes == 2048 and c.ring_bwd_bytes == 2048 + 4096 + 4096    # + the final dk/dv return
    assert c.ring_fwd_exposed_s == pytest.approx(2048 / 1e9)
    assert c.ring_bwd_exposed_s == pytest.approx(10240 / 1e9)
    assert c.a2a_fwd_bytes == c.a2a_fwd_s == 0
    # Behind enough attention only the final dk/dv return is left exposed.
    hidden = _comm(backend="ring", attn_fwd_s=1.0, attn_bwd_s=1.0)
    assert hidden.fwd_exposed_s == 0 and hidden.bwd_exposed_s == pytest.approx(4096 / 1e9)


def test_hybrid_is_ulysses_in_the_node_and_ring_across():
    c = _comm(sp=4, gpus_per_node=2, backend="hybrid")
    assert (c.ulysses_degree, c.ring_degree) == (2, 2)
    assert c.a2a_fwd_bytes == 16 * 208 / 2 and c.a2a_fwd_s == pytest.approx(16 * 208 / 2 / 1e9)   # NVLink
    # Ring blocks of s U = 32 tokens of kv / U = 1 head: the bytes of a 16-token, 2-head block, over the slow link.
    assert c.ring_fwd_bytes == 2 * 16 * 2 * 8 * 2 and c.ring_fwd_transfer_s == pytest.approx(1024 / 1e8)
    # Inside one node hybrid is plain Ulysses.
    assert _comm(sp=2, gpus_per_node=8, backend="hybrid").to_dict() == dict(_comm().to_dict(), backend="hybrid")


def _step(model, backend, sp, gpn, seq=1 << 18, gpu="h100"):
    return step_time(model, get_gpu(gpu), seq_len=seq, micro_batch=1, sp=sp, gpus=sp, gpus_per_node=gpn, alpha=1.0,
                     swap_bytes_fixed=0, swap_bytes_other=0, keep_layers=2, zero_stage=1, offload_optimizer=False,
                     sp_backend=backend)


def test_ordering_when_intra_node_is_much_faster_than_inter_node():
    m = get_preset("llama2-7b")            # H100: 450 GB/s NVLink, 25 GB/s per GPU across nodes
    # Two nodes of 8: the ring's blocks cross the slow link at every step and 256K tokens leave too
    # little attention per step to hide them; hybrid only sends its ring blocks (one step) across.
    ring, uly, hyb = (_step(m, b, 16, 8) for b in ("ring", "ulysses", "hybrid"))
    total = lambda t: t.sp_comm_fwd_s + t.sp_comm_bwd_s                                  # noqa: E731
    assert total(hyb) < total(uly) < total(ring)
    assert hyb.sp_comm_fwd_s < uly.sp_comm_fwd_s < ring.sp_comm_fwd_s
    assert ring.step_time_s > max(uly.step_time_s, hyb.step_time_s)
    # One node: the ring's transfers hide behind attention, the all-to-all cannot; hybrid is Ulysses.
    ring, uly, hyb = (_step(m, b, 8, 8) for b in ("ring", "ulysses", "hybrid"))
    assert ring.sp_comm_fwd_s == 0 < uly.sp_comm_fwd_s == hyb.sp_comm_fwd_s
    assert hyb.step_time_s == uly.step_time_s
    # ... yet Ulysses is predicted faster: its all-to-all is ~1% of the layer, and its attention is
    # plain flash attention, not the ring's ring_eff of it (NOTE [ SP communication model ] rule 4).
    assert uly.step_time_s < ring.step_time_s
    # GQA with 8 kv heads: Ulysses cannot split 16 ways, hybrid can. Its k/v blocks are 4x smaller,
    # so at 256K the ring hides them and only the final dk/dv return is left: the ring wins; at 64K
    # (16x less attention per step) it cannot hide them and hybrid wins.
    g = get_preset("llama3-8b")
    with pytest.raises(SPBackendError, match="use --sp-backend ring, which has no head-count limit"):
        _step(g, "ulysses", 16, 8)
    assert total(_step(g, "ring", 16, 8)) < total(_step(g, "hybrid", 16, 8))
    assert total(_step(g, "hybrid", 16, 8, seq=1 << 16)) < total(_step(g, "ring", 16, 8, seq=1 << 16))


def test_step_time_adds_the_exposed_sp_comm_per_layer():
    m = get_preset("llama2-7b")
    for backend in ("ring", "ulysses", "hybrid"):
        t = _step(m, backend, 16, 8, seq=1 << 16)
        assert t.sp_comm_fwd_s == pytest.approx(t.sp_comm.fwd_exposed_s) and t.sp_comm_fwd_s > 0
        assert t.ulysses_a2a_fwd_s == t.sp_comm.a2a_fwd_s and t.ring_exposed_bwd_s == t.sp_comm.ring_bwd_exposed_s
        n = m["layers"]
        layers = n * (t.layer_forward_s + t.layer_backward_s + t.layer_recompute_s + t.sp_comm_fwd_s + t.sp_comm_bwd_s)
        assert t.step_time_s == pytest.approx(layers + t.copy_exposed_s + t.head_s + t.optimizer_s + t.collectives_s)


@pytest.mark.parametrize("backend,sp,gpn,match", [
    ("tree", 8, 8, "'tree' is not one of ring, ulysses, hybrid"),
    ("ulysses", 3, 8, "4 heads and 2 kv heads, not divisible by 3; use --sp-backend ring"),
    ("ulysses", 4, 8, "2 kv heads, not divisible by 4; use --sp-backend ring"),
    ("hybrid", 6, 4, "4 does not divide --sp 6"),
    ("hybrid", 8, 4, "over the GPUs of a node .* = 4 ranks, but the model has 2 kv heads"),
])
def test_sp_degrees_refusals(backend, sp, gpn, match):
    with pytest.raises(SPBackendError, match=match) as e:
        sp_degrees(TINY, sp, backend, gpn)
    assert str(e.value).startswith("memo.plan: ")


def test_sp_degrees():
    assert sp_degrees(TINY, 8, "ring", 8) == SPDegrees("ring", 1, 8)
    assert sp_degrees(TINY, 2, "ulysses", 1) == SPDegrees("ulysses", 2, 1)
    assert sp_degrees(TINY, 8, "hybrid", 2) == SPDegrees("hybrid", 2, 4)
    assert sp_degrees(TINY, 1, "ulysses", 8) == SPDegrees("ulysses", 1, 1)


# --- Level 1: what each backend holds at the attention step ---------------------------------------

LAYER = {"model_type": "llama", "layers": 2, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2,
         "head_dim": 16, "vocab": 256}


@pytest.fixture(scope="module")
def profile():
    from memo.profile import profile_model
    return profile_model(LAYER, seq_len=256, sp=2).to_dict()         # 128 tokens per rank


def _live_at(allocs, step):
    return [b for s, b in live_bytes_over_time(allocs) if s <= step][-1]


def test_level1_ulysses_buffers_replace_the_ring_buffers(profile):
    # Forward: 128 tokens x (q 4 + k 2 + v 2 + out 4 heads) x 16 x 2 B + LSE 128 x 4 x 4 B.
    assert sum(ulysses_buffer_bytes(profile)["forward"].values()) == 128 * (12 * 16 * 2 + 16) == 51200
    # Backward: q, k, v, out, dout (16 heads' worth) and dq, dk, dv (8): 24 x 16 x 2 B, + LSE.
    assert sum(ulysses_buffer_bytes(profile)["backward"].values()) == 128 * (24 * 16 * 2 + 16) == 100352
    ring = layer_allocs(profile, "forward", SPDegrees("ring", 1, 2))
    uly = layer_allocs(profile, "forward", SPDegrees("ulysses", 2, 1))
    hyb = layer_allocs(profile, "forward", SPDegrees("hybrid", 2, 2))
    kinds = lambda allocs: {a.kind for a in allocs}                                        # noqa: E731
    assert "ring_buffer" in kinds(ring) and "ulysses_buffer" not in kinds(ring)
    assert "ring_buffer" not in kinds(uly) and "ulysses_buffer" in kinds(uly)
    assert {"ring_buffer", "ulysses_buffer"} <= kinds(hyb)
    step = next(a.start for a in ring if a.kind == "attention_output")
    assert {a.start for a in uly if a.kind == "ulysses_buffer"} == {step}
    ring_buf = sum(a.bytes for a in ring if a.kind == "ring_buffer")
    assert _live_at(uly, step) == _live_at(ring, step) - ring_buf + 51200
    assert _live_at(hyb, step) == _live_at(ring, step) + 51200
    bwd = layer_allocs(profile, "backward", SPDegrees("ulysses", 2, 1))
    assert sum(a.bytes for a in bwd if a.kind == "ulysses_buffer") == 100352


def test_level1_must_match_the_clusters_backend(profile):
    cl = Cluster(gpus=2, sp=2, gpu=get_gpu("a800"), host_memory=64 << 30, sp_backend="ulysses")
    ring_l1 = solve_level1(profile, use_mip=False)
    with pytest.raises(ValueError, match="solved for .*ring.* the cluster runs .*ulysses"):
        finish_plan(PlanContext(profile, cl, Options(use_mip=False), ring_l1), 1)
    plan = finish_plan(PlanContext(profile, cl, Options(use_mip=False),
                                   solve_level1(profile, degrees=cl.sp_degrees(LAYER), use_mip=False)), 1)
    assert plan["sp_backend"] == "ulysses" and plan["sp_degrees"] == {"ulysses": 2, "ring": 1}
    assert plan["layer"]["sp_buffer_bytes"] == {"forward": 51200, "backward": 100352}
    assert plan["predicted"]["sp_comm"]["a2a_fwd_bytes"] > 0


# --- memo plan --sp-backend ----------------------------------------------------------------------

def _cli(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def qwen(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 1024, "num_hidden_layers": 4,
                               "intermediate_size": 2816, "num_attention_heads": 16, "num_key_value_heads": 4,
                               "vocab_size": 32000}))
    return ["--model", str(cfg), "--seq-len", "64K", "--gpus", "4", "--sp", "4", "--gpus-per-node", "2",
            "--host-memory", "256GiB", "--no-mip"]


@pytest.mark.parametrize("backend,degrees", [("ring", (1, 4)), ("ulysses", (4, 1)), ("hybrid", (2, 2))])
def test_cli_records_the_backend_and_its_comm(capsys, tmp_path, qwen, backend, degrees):
    out_path = tmp_path / "plan.json"
    code, out, err = _cli(capsys, *qwen, "--sp-backend", backend, "--json", "--out", str(out_path))
    assert code == 0, err
    plan = json.loads(out)
    assert plan["sp_backend"] == backend and (plan["sp_degrees"]["ulysses"], plan["sp_degrees"]["ring"]) == degrees
    t, c = plan["predicted"]["times"], plan["predicted"]["sp_comm"]
    assert t["sp_comm_fwd_s"] == pytest.approx(c["fwd_exposed_s"]) and t["sp_comm_bwd_s"] == pytest.approx(
        c["bwd_exposed_s"])
    assert (c["a2a_fwd_s"] > 0) == (degrees[0] > 1) and (c["ring_fwd_bytes"] > 0) == (degrees[1] > 1)
    kinds = {x["kind"] for x in plan["layer"]["forward"]["tensors"]}
    assert ("ulysses_buffer" in kinds) == (degrees[0] > 1) and ("ring_buffer" in kinds) == (degrees[1] > 1)
    saved = load_plan(str(out_path))
    assert plan_sp_backend(saved) == backend
    check_plan_matches(saved, model=plan["model"], seq_len=1 << 16, micro_batch=1, dtype="bf16", sp=4,
                       sp_backend=backend)
    other = "ring" if backend != "ring" else "ulysses"
    with pytest.raises(PlanMismatch, match=f"sp_backend: plan '{backend}', run '{other}'"):
        check_plan_matches(saved, model=plan["model"], seq_len=1 << 16, micro_batch=1, dtype="bf16", sp=4,
                           sp_backend=other)


def test_cli_report_shows_the_backend_and_an_old_plan_reads_as_ring(capsys, tmp_path, qwen):
    code, out, err = _cli(capsys, *qwen, "--sp-backend", "hybrid")
    assert code == 0, err
    for text in ("SP 4 hybrid = Ulysses 2 in a node x ring 2 across nodes (16,384 tokens per rank)",
                 "SP comm:   hybrid, exposed per layer: forward ", "all-to-all over 2: ", "ring of 2: ",
                 "of which hybrid buffers (attention step)"):
        assert text in out, out
    # A plan written before sp_backend existed: the ring, shown and matched as such.
    path = tmp_path / "old.json"
    code, out, err = _cli(capsys, *qwen, "--json", "--out", str(path))
    assert code == 0, err
    old = json.loads(path.read_text())
    for key in ("sp_backend", "sp_degrees"):
        old.pop(key)
    old["predicted"].pop("sp_comm")
    old["layer"].pop("sp_buffer_bytes")
    for key in ("ulysses_a2a_fwd_s", "ulysses_a2a_bwd_s", "sp_comm_fwd_s", "sp_comm_bwd_s"):
        old["predicted"]["times"].pop(key)
    path.write_text(json.dumps(old))
    code, out, err = _cli(capsys, "--from-plan", str(path))
    assert code == 0, err
    assert "SP 4 ring (" in out and "SP comm:   ring, exposed per layer" in out
    check_plan_matches(load_plan(str(path)), model=old["model"], seq_len=1 << 16, micro_batch=1, dtype="bf16", sp=4,
                       sp_backend="ring")
