"""Layer policies (NOTE [ Layer policies ] in memo/executor.py): "input" layers keep only their input
on the host and recompute attention; auto falls back to them when the host budget is short; a
plan's mix is run as given."""

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import memo
from memo.cli.main import main as cli
from memo.wrap import runtime_of
from models import batch, build, run_step, twin

SEQ = 64


def _needs(model, micro) -> tuple[list[int], list[int]]:
    """Host bytes per swapped layer under "memo" at ratio 0 and under "input", as the runtime sizes them."""
    probe = twin(model)
    memo.wrap(probe, memo.MemoConfig(swap_ratio=0.0, keep_last_layers=0, tile_tokens=None, loss_chunk_size=None,
                                     host_memory_budget="1GiB"))
    run_step(probe, micro)
    rt = runtime_of(probe)
    swapped = sorted(rt.swapped)
    needs = [rt._layer_needs(rt.current_traces, 0.0, rt.current_device, {i: p for i in swapped})
             for p in ("memo", "input")]
    return needs[0], needs[1]


def _auto(model, budget: int, **config):
    m = twin(model)
    memo.wrap(m, memo.MemoConfig(swap_ratio="auto", keep_last_layers=0, tile_tokens=None, loss_chunk_size=None,
                                 host_memory_budget=budget, **config))
    return m


def test_input_layers_are_bit_exact_and_hold_only_their_input():
    """Every layer "input": the recompute is the forward again, so gradients are the plain model's bits."""
    model = build("llama")
    micro = [batch(2, SEQ, pad_last=5)]
    memo_need, input_need = _needs(model, micro)
    ref_losses, ref = run_step(twin(model), micro)
    with pytest.warns(UserWarning, match="4 of 4 swapped layers keep only their input"):
        wrapped = _auto(model, sum(input_need))
        losses, got = run_step(wrapped, micro)
    assert torch.equal(ref_losses[0], losses[0])
    for name in ref:
        assert torch.equal(ref[name], got[name]), name
    st = memo.stats(wrapped)
    assert [s.policy for s in st.layers] == ["input"] * 4
    hidden_bytes = 2 * SEQ * 64 * 4
    assert all(s.swapped_bytes == hidden_bytes for s in st.layers), [s.swapped_bytes for s in st.layers]
    assert all(s.recomputed_bytes > 0 for s in st.layers)
    assert input_need[0] < memo_need[0]


def test_auto_uses_the_fewest_input_layers_that_fit():
    model = build("llama")
    micro = [batch(2, SEQ)]
    memo_need, input_need = _needs(model, micro)
    budget = sum(input_need[:2]) + sum(memo_need[2:])   # room for exactly two "memo" layers at ratio 0
    with pytest.warns(UserWarning, match="2 of 4 swapped layers"):
        wrapped = _auto(model, budget)
        run_step(wrapped, micro)
    st = memo.stats(wrapped)
    assert [s.policy for s in st.layers] == ["input", "input", "memo", "memo"]
    assert "recompute attention" in st.swap_ratio_reason
    # ... and within twice the plain model's error (the memo layers recompute token-wise at ratio 0)
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    _, got = run_step(wrapped, micro)
    for n in ref64:
        assert (got[n].double() - ref64[n]).abs().max() <= 2 * (plain[n].double() - ref64[n]).abs().max(), n


def test_a_budget_that_holds_everything_keeps_memo_everywhere():
    model = build("llama")
    wrapped = _auto(model, "1GiB")
    run_step(wrapped, [batch(2, SEQ)])
    assert [s.policy for s in memo.stats(wrapped).layers] == ["memo"] * 4


def test_a_budget_short_of_the_inputs_is_refused_before_the_first_forward():
    model = build("llama")
    micro = [batch(2, SEQ)]
    _, input_need = _needs(model, micro)
    wrapped = _auto(model, sum(input_need) - 1)
    calls = []   # real attention calls (memo's own trace runs the layer on fake tensors, no memory)
    wrapped.model.layers[0].self_attn.register_forward_hook(
        lambda mod, args, out: calls.append(1) if not isinstance(out[0], FakeTensor) else None)
    with pytest.raises(memo.MemoError, match=rf"cannot hold even the layer inputs of 4 swapped layers, which need "
                                             rf".*host_memory_budget="):
        run_step(wrapped, micro)
    assert calls == []


def test_input_layers_with_dropout_redraw_the_forward_masks():
    """Phi3 with residual dropout: the "input" recompute restores the RNG (NOTE [ Layer policies ] rule 4)."""
    import transformers
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, pad_token_id=0, resid_pdrop=0.3, use_cache=False, attn_implementation="sdpa")).train()
    micro = [batch(2, 40)]
    torch.manual_seed(5)
    _, plain = run_step(twin(model), micro)
    with pytest.warns(UserWarning, match="3 of 3"):
        wrapped = _auto(model, 3 * 2 * 40 * 64 * 4)
        torch.manual_seed(5)
        _, got = run_step(wrapped, micro)
    assert [s.policy for s in memo.stats(wrapped).layers] == ["input"] * 3
    for name in plain:
        assert torch.equal(plain[name], got[name]), name


@pytest.fixture(scope="module")
def mixed_plan(tmp_path_factory):
    """A plan from `memo plan` whose layer mix says: layer 0 "input", 1-2 "memo", 3 kept."""
    d = tmp_path_factory.mktemp("plan")
    build("llama").config.to_json_file(str(d / "config.json"))
    out = d / "plan.json"
    assert cli(["plan", "--model", str(d / "config.json"), "--seq-len", str(SEQ), "--micro-batch", "2", "--gpus", "1",
                "--sp", "1", "--gpu", "a100-80g", "--host-memory", "64GiB", "--dtype", "fp32", "--swap-ratio", "0.5",
                "--time-limit", "2", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    plan.update(layer_policies=["input", "memo", "memo", "kept"], keep_layers=1, tile_tokens=16)
    out.write_text(json.dumps(plan))
    return out


def test_runtime_runs_the_plans_mix(mixed_plan):
    model = build("llama")
    micro = [batch(2, SEQ)]
    wrapped = twin(model)
    # keep_last_layers left at its default: the plan decides (NOTE [ A plan decides the layers ])
    memo.wrap(wrapped, memo.MemoConfig(plan=str(mixed_plan), loss_chunk_size=None, host_memory_budget="1GiB"))
    _, ref64 = run_step(twin(model, torch.float64), micro)
    _, plain = run_step(twin(model), micro)
    _, got = run_step(wrapped, micro)
    st = memo.stats(wrapped)
    assert [s.policy for s in st.layers] == ["input", "memo", "memo", "kept"]
    assert [s.tile_tokens for s in st.layers] == [16] * 4
    assert st.layers[0].swapped_bytes == 2 * SEQ * 64 * 4 < st.layers[1].swapped_bytes
    assert st.layers[3].kept and st.layers[3].swapped_bytes == 0 and st.layers[3].resident_bytes > 0
    assert st.swap_ratio == 0.5
    for n in ref64:
        assert (got[n].double() - ref64[n]).abs().max() <= 2 * (plain[n].double() - ref64[n]).abs().max(), n


def test_a_plan_for_another_layer_count_is_refused(mixed_plan, tmp_path):
    plan = json.loads(mixed_plan.read_text())
    plan["layer_policies"] = ["memo", "kept"]
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps(plan))
    with pytest.raises(memo.MemoError, match="one policy for each of the model's 4 layers"):
        memo.wrap(build("llama"), memo.MemoConfig(plan=str(bad), keep_last_layers=1, host_memory_budget="1GiB"))
