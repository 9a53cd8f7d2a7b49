"""Plan files: round trip, corrupt files refused, plans for another job refused by field."""

import json

import pytest

from memo.planner.planfile import (PlanFileError, PlanMismatch, check_plan_matches, load_plan, plan_sp_backend,
                                   write_plan)

MODEL = {"model_type": "llama", "layers": 32, "hidden": 4096, "intermediate": 11008, "heads": 32, "kv_heads": 32,
         "head_dim": 128, "vocab": 32000}


def _plan():
    layout = {"peak_bytes": 3072, "lower_bound_bytes": 3072, "solve_s": 0.1,
              "tensors": [{"id": "f0", "bytes": 1024, "start": 0, "end": 3, "offset": 0},
                          {"id": "f1", "bytes": 2048, "start": 1, "end": 3, "offset": 1024}]}
    return {"memo_plan_version": 1, "model": dict(MODEL), "seq_len": 1 << 20, "micro_batch": 1, "dtype": "bf16",
            "sp": 8, "alpha": 0.5, "fits": True, "predicted": {"step_time_s": 1.0, "mfu": 0.5,
                                                                "device_peak_bytes": 1, "host_bytes": 1},
            "layer": {"forward": layout, "backward": layout}, "step": {"peak_bytes": 9, "lower_bound_bytes": 9}}


def test_round_trip_and_match(tmp_path):
    path = tmp_path / "plan.json"
    write_plan(str(path), _plan())
    plan = load_plan(str(path))
    assert plan == _plan()
    check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="torch.bfloat16", sp=8)


def test_sp_backend_round_trip_and_match(tmp_path):
    path = tmp_path / "plan.json"
    write_plan(str(path), dict(_plan(), sp_backend="ulysses"))
    plan = load_plan(str(path))
    assert plan["sp_backend"] == plan_sp_backend(plan) == "ulysses"
    check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8, sp_backend="ulysses")
    check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8)   # not checked
    with pytest.raises(PlanMismatch, match="sp_backend: plan 'ulysses', run 'ring'"):
        check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8, sp_backend="ring")


def test_plan_without_sp_backend_was_made_for_the_ring(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_plan()))                 # written before the field existed
    plan = load_plan(str(path))
    assert "sp_backend" not in plan and plan_sp_backend(plan) == "ring"
    check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8, sp_backend="ring")
    with pytest.raises(PlanMismatch, match="sp_backend: plan 'ring', run 'hybrid'"):
        check_plan_matches(plan, model=MODEL, seq_len=1 << 20, micro_batch=1, dtype="bf16", sp=8, sp_backend="hybrid")


def test_mismatch_names_every_field_that_differs(tmp_path):
    plan = _plan()
    other = dict(MODEL, hidden=5120, kv_heads=8)
    with pytest.raises(PlanMismatch) as e:
        check_plan_matches(plan, model=other, seq_len=1 << 19, micro_batch=1, dtype="fp32", sp=8)
    msg = str(e.value)
    assert msg.startswith("memo.plan: ")
    for part in ("model.hidden: plan 4096, run 5120", "model.kv_heads: plan 32, run 8",
                 "seq_len: plan 1048576, run 524288", "dtype: plan 'bf16', run 'fp32'"):
        assert part in msg
    assert "micro_batch" not in msg and "sp:" not in msg
    assert msg.rstrip().endswith("drop MemoConfig(plan=...)")


@pytest.mark.parametrize("text,match", [
    ("", "not valid JSON"),
    ('{"memo_plan_version": 1, "model": {', "not valid JSON"),
    ("[1, 2]", "holds a list"),
    ('{"memo_plan_version": 1}', "lacks field 'model'"),
])
def test_corrupt_files_are_refused(tmp_path, text, match):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanFileError, match=match):
        load_plan(str(path))


def test_schema_violations_are_refused(tmp_path):
    path = tmp_path / "plan.json"
    cases = [
        (lambda p: p.update(memo_plan_version=99), "plan version 99"),
        (lambda p: p["model"].pop("vocab"), "model identity lacks vocab"),
        (lambda p: p.update(alpha=1.5), "alpha 1.5 is outside"),
        (lambda p: p.update(seq_len="1M"), "'seq_len' is '1M'"),
        (lambda p: p["layer"]["forward"]["tensors"][1].update(offset=2048), "lies outside its arena"),
        (lambda p: p["layer"]["backward"]["tensors"][0].pop("offset"), "lacks one of"),
        (lambda p: p["step"].pop("peak_bytes"), "step.peak_bytes"),
        (lambda p: p.update(sp_backend="tree"), "sp_backend 'tree' is not one of ring, ulysses, hybrid"),
    ]
    for mutate, match in cases:
        plan = _plan()
        mutate(plan)
        path.write_text(json.dumps(plan))
        with pytest.raises(PlanFileError, match=match):
            load_plan(str(path))
    with pytest.raises(PlanFileError, match="cannot read plan file"):
        load_plan(str(tmp_path / "missing.json"))
