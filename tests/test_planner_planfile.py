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


POLICIES = ["input"] * 5 + ["memo"] * 25 + ["kept"] * 2       # MODEL has 32 layers


def test_layer_policies_and_tile_round_trip(tmp_path):
    from memo.planner.planfile import plan_layer_policies, plan_tile_tokens
    path = tmp_path / "plan.json"
    write_plan(str(path), dict(_plan(), layer_policies=POLICIES, keep_layers=2, tile_tokens=9216))
    plan = load_plan(str(path))
    assert plan_layer_policies(plan) == POLICIES and plan_tile_tokens(plan) == 9216
    write_plan(str(path), dict(_plan(), layer_policies=["memo"] * 32, keep_layers=0, tile_tokens=None))
    plan = load_plan(str(path))
    assert plan_layer_policies(plan) == ["memo"] * 32 and plan_tile_tokens(plan) is None


def test_plan_without_policies_reads_as_memo_and_kept_untiled(tmp_path):
    from memo.planner.planfile import plan_layer_policies, plan_tile_tokens
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dict(_plan(), keep_layers=3)))      # written before the fields existed
    plan = load_plan(str(path))
    assert plan_layer_policies(plan) == ["memo"] * 29 + ["kept"] * 3 and plan_tile_tokens(plan) is None


@pytest.mark.parametrize("fields,match", [
    ({"layer_policies": POLICIES[:-1]}, "one policy for each of the model's 32 layers"),
    ({"layer_policies": "memo"}, "one policy for each of the model's 32 layers"),
    ({"layer_policies": ["memo"] * 31 + ["swap"]}, "holds 'swap', not one of memo, input, kept"),
    ({"layer_policies": ["kept"] + ["memo"] * 31}, "\"kept\" layers before swapped ones"),
    ({"layer_policies": POLICIES, "keep_layers": 3}, "keeps 2 layers, keep_layers says 3"),
    ({"keep_layers": 33}, "keep_layers 33 is not an int in \\[0, 32\\]"),
    ({"tile_tokens": 0}, "tile_tokens 0 is neither null"),
    ({"tile_tokens": "auto"}, "tile_tokens 'auto' is neither null"),
    ({"tile_tokens": True}, "tile_tokens True is neither null"),
])
def test_bad_policies_and_tile_refused(tmp_path, fields, match):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(dict(_plan(), **fields)))
    with pytest.raises(PlanFileError, match=match):
        load_plan(str(path))
    with pytest.raises(PlanFileError, match=match):
        write_plan(str(tmp_path / "out.json"), dict(_plan(), **fields))
