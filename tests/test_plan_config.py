"""MemoConfig(plan=...) input (issue 18 item 8): a plan is a path (plan=0 once read file descriptor 0,
the process's stdin), and a plan made with other kept layers than a keep_last_layers the user gave
is refused, while the default lets the plan decide (NOTE [ A plan decides the layers ] in
memo/config.py)."""

import json
import warnings

import pytest

import memo
from memo import MemoError
from memo.cli.main import main as cli
from models import batch, build, run_step


@pytest.mark.parametrize("plan", [0, 3, True, 1.5, b"plan.json", ""])
def test_a_plan_that_is_not_a_path_is_refused(plan):
    with pytest.raises(MemoError, match=f"memo.config: plan={plan!r} is not a path; pass the path of the plan file"):
        memo.MemoConfig(plan=plan, host_memory_budget="1GiB")


def test_a_path_object_is_a_path(tmp_path):
    assert memo.MemoConfig(plan=tmp_path / "p.json", host_memory_budget="1GiB").plan == str(tmp_path / "p.json")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A plan keeping the last 2 of 4 layers (memo plan at a given ratio), and the same plan keeping 1."""
    d = tmp_path_factory.mktemp("plan")
    build("llama").config.to_json_file(str(d / "config.json"))
    keep2 = d / "keep2.json"
    assert cli(["plan", "--model", str(d / "config.json"), "--seq-len", "64", "--micro-batch", "2", "--gpus", "1",
                "--sp", "1", "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32", "--swap-ratio", "0.5",
                "--keep-layers", "2", "--no-mip", "--out", str(keep2)]) == 0
    plan = json.loads(keep2.read_text())
    assert plan["layer_policies"] == ["memo", "memo", "kept", "kept"]
    plan.update(layer_policies=["memo", "memo", "memo", "kept"], keep_layers=1)
    keep1 = d / "keep1.json"
    keep1.write_text(json.dumps(plan))
    return {1: keep1, 2: keep2}


def _wrap(plan, **kw):
    return memo.wrap(build("llama"), memo.MemoConfig(plan=str(plan), loss_chunk_size=None,
                                                     host_memory_budget="1GiB", **kw))


def test_the_default_keep_last_layers_lets_the_plan_decide_silently(plans):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _wrap(plans[1])
    run_step(model, [batch(2, 64)])
    assert [s.kept for s in memo.stats(model).layers] == [False, False, False, True]


@pytest.mark.parametrize("given,plan", [(2, 1), (0, 1), (1, 2)])
def test_a_given_keep_last_layers_that_contradicts_the_plan_is_refused(plans, given, plan):
    with pytest.raises(MemoError) as e:
        _wrap(plans[plan], keep_last_layers=given)
    msg = str(e.value)
    assert f"keep_last_layers={given} contradicts plan {plans[plan]}, which keeps {plan} layer(s)" in msg, msg
    assert "drop keep_last_layers" in msg and f"--keep-layers {given}" in msg, msg


def test_a_given_keep_last_layers_that_agrees_is_used(plans):
    model = _wrap(plans[2], keep_last_layers=2)
    run_step(model, [batch(2, 64)])
    assert [s.kept for s in memo.stats(model).layers] == [False, False, True, True]
    assert memo.MemoConfig(host_memory_budget="1GiB").keep_last_layers == 2   # the default is still 2
    from memo.integrations.accelerate import MemoPlugin
    assert MemoPlugin(keep_last_layers=1).to_memo_config(host_memory_budget="1GiB").keep_last_layers_given
