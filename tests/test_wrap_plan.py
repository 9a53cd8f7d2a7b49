"""MemoConfig(plan=...): the runtime takes alpha from a plan and refuses a plan for another job."""

import json

import pytest

import memo
from memo import MemoError
from memo.cli.main import main as cli
from models import batch, build, run_step


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    build("llama").config.to_json_file(str(d / "config.json"))
    out = d / "plan.json"
    code = cli(["plan", "--model", str(d / "config.json"), "--seq-len", "64", "--micro-batch", "2", "--gpus", "1",
                "--sp", "1", "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32",
                "--swap-ratio", "0.25", "--time-limit", "2", "--out", str(out)])
    assert code == 0
    return out


def _wrap(model, plan):
    return memo.wrap(model, memo.MemoConfig(plan=str(plan), loss_chunk_size=None, host_memory_budget="1GiB"))


def test_runtime_uses_the_plans_alpha(plan_path):
    alpha = json.loads(plan_path.read_text())["alpha"]
    model = _wrap(build("llama"), plan_path)
    run_step(model, [batch(2, 64)])
    st = memo.stats(model)
    assert st.swap_ratio == pytest.approx(alpha) and alpha == 0.25
    assert "from plan" in st.swap_ratio_reason and st.recomputed_bytes > 0


def test_plan_for_another_model_is_refused(plan_path):
    with pytest.raises(MemoError, match=r"model\.hidden: plan 64, run 128"):
        _wrap(build("llama", hidden_size=128, intermediate_size=256), plan_path)


def test_plan_for_another_length_is_refused_before_compute(plan_path):
    model = _wrap(build("llama"), plan_path)
    with pytest.raises(MemoError, match=r"seq_len: plan 64, run 32"):
        run_step(model, [batch(2, 32)])
    with pytest.raises(MemoError, match=r"micro_batch: plan 2, run 1"):
        run_step(model, [batch(1, 64)])


def test_corrupt_plan_is_refused(tmp_path, plan_path):
    bad = tmp_path / "bad.json"
    bad.write_text(plan_path.read_text()[:100])
    with pytest.raises(MemoError, match="not valid JSON"):
        _wrap(build("llama"), bad)
    with pytest.raises(MemoError, match="cannot read plan file"):
        _wrap(build("llama"), tmp_path / "missing.json")


def test_sequence_parallel_plan_is_used_and_another_sp_size_refused(tmp_path, plan_path):
    from distributed import launch
    build("llama").config.to_json_file(str(tmp_path / "config.json"))
    sp_plan = tmp_path / "plan-sp2.json"
    assert cli(["plan", "--model", str(tmp_path / "config.json"), "--seq-len", "64", "--micro-batch", "1", "--gpus",
                "2", "--sp", "2", "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32",
                "--swap-ratio", "0.5", "--time-limit", "2", "--out", str(sp_plan)]) == 0
    one_rank = tmp_path / "plan-sp1.json"
    assert cli(["plan", "--model", str(tmp_path / "config.json"), "--seq-len", "64", "--micro-batch", "1", "--gpus",
                "1", "--sp", "1", "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32",
                "--swap-ratio", "0.5", "--time-limit", "2", "--out", str(one_rank)]) == 0
    for res in launch("plan_cases.py", 2, sp_plan=str(sp_plan), one_rank_plan=str(one_rank)):
        assert res["alpha"] == pytest.approx(0.5) and "from plan" in res["reason"] and res["recomputed"] > 0
        assert res["refused"] is not None and "sp: plan 1, run 2" in res["refused"]
