"""Checkpoints of memo-wrapped models (issue 9 item 5).

1. ``save_pretrained`` / ``from_pretrained`` while wrapped (swapping on): the safetensors file has
   exactly the plain model's keys and tensors, and the reloaded model, wrapped again, has identical
   parameters and gives an identical loss. Tied and untied embeddings.
2. ``memo.integrations.checkpoint``: a run interrupted after K of N steps and resumed into objects
   built from scratch gives bit-identical losses (fp32, CPU, AdamW + LambdaLR). Each piece of saved
   state is shown to matter: disturbing it after the load changes the losses.
3. The same on 2 gloo ranks with sequence parallelism (tests/sp_workers/ckpt_sp.py), where the
   ranks' numpy streams differ and each rank must get its own back.
4. Bad input: an incomplete directory, another model, another optimizer, another world size, a
   state that needs pickle.

Atomic saves: tests/test_checkpoint_atomic.py; checked loads: tests/test_checkpoint_checks.py.
"""

import copy
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

import memo
from distributed import launch
from memo.integrations.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from models import build
from sp_workers import ckpt_loop
from transformers import LlamaForCausalLM

N, K = 5, 2


def _keys(directory: str) -> set:
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return set(f.keys())


def _plain_keys() -> set:
    return set(build("llama", seed=0, num_hidden_layers=ckpt_loop.LAYERS).state_dict())


def _tensors(directory: str) -> dict:
    with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("tied", [False, True])
def test_save_pretrained_round_trip_while_wrapped(tmp_path, tied):
    plain = build("llama", seed=0, num_hidden_layers=ckpt_loop.LAYERS, tie_word_embeddings=tied)
    model = memo.wrap(copy.deepcopy(plain), ckpt_loop.config())
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(5))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert memo.stats(model).swapped_bytes > 0, "the test needs swapping on"

    model.save_pretrained(tmp_path / "wrapped")
    plain.save_pretrained(tmp_path / "plain")
    assert _keys(tmp_path / "wrapped") == _keys(tmp_path / "plain")
    assert _keys(tmp_path / "plain") <= set(plain.state_dict()), "sanity: the plain save uses state_dict names"
    assert ("lm_head.weight" in _keys(tmp_path / "plain")) != tied
    saved, want = _tensors(tmp_path / "wrapped"), _tensors(tmp_path / "plain")
    assert all(torch.equal(saved[k], want[k]) for k in want)

    fresh = LlamaForCausalLM.from_pretrained(tmp_path / "wrapped", attn_implementation="sdpa")
    memo.wrap(fresh, ckpt_loop.config())
    got = dict(fresh.named_parameters())
    assert set(got) == set(dict(model.named_parameters()))
    assert all(torch.equal(got[n], p) for n, p in model.named_parameters())
    assert torch.equal(fresh(input_ids=ids, labels=ids).loss, loss)


def _run_uninterrupted():
    ckpt_loop.seed_all(0)
    model, opt, sched = ckpt_loop.make(model_seed=0)
    return ckpt_loop.train(model, opt, sched, N, {"cursor": 0})


def _run_to_checkpoint(path):
    ckpt_loop.seed_all(0)
    model, opt, sched = ckpt_loop.make(model_seed=0)
    data = {"cursor": 0}
    losses = ckpt_loop.train(model, opt, sched, K, data)
    save_checkpoint(path, model=model, optimizer=opt, scheduler=sched, step=K, data_state=data)
    return losses


def _resume(path, disturb=None):
    """Fresh objects (another init seed, other RNG seeds), loaded from ``path``, trained N - K steps."""
    ckpt_loop.seed_all(99)
    model, opt, sched = ckpt_loop.make(model_seed=1)
    if disturb == "scheduler":
        with pytest.warns(UserWarning, match="has a scheduler state but no scheduler was passed"):
            state = load_checkpoint(path, model=model, optimizer=opt)
    else:
        state = load_checkpoint(path, model=model, optimizer=opt, scheduler=sched)
    assert state["step"] == K
    data = state["data_state"]
    if disturb == "torch":
        torch.manual_seed(7)
    elif disturb == "python":
        random.seed(7)
    elif disturb == "numpy":
        np.random.seed(7)
    elif disturb == "data":
        data["cursor"] += 1
    elif disturb == "optimizer":
        opt.state.clear()
    return ckpt_loop.train(model, opt, sched, N - K, data)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt"))
    full = _run_uninterrupted()
    first = _run_to_checkpoint(path)
    return path, full, first


def test_resume_is_bit_identical(resumed_run):
    path, full, first = resumed_run
    rest = _resume(path)
    got = first + rest
    assert len(got) == N
    for i, (a, b) in enumerate(zip(got, full)):
        assert torch.equal(a, b), f"step {i}: resumed loss {a.item()!r} != uninterrupted {b.item()!r}"
    # What was written: JSON and safetensors only (nothing to unpickle), the plain model's keys.
    assert sorted(os.listdir(path)) == ["latest.json", "step-000000002"]   # NOTE [ Checkpoint layout ] rule 1
    step = latest_checkpoint(path)
    assert sorted(os.listdir(step)) == ["config.json", "model.safetensors", "rank0.json", "rank0.safetensors",
                                        "state.json", "state.safetensors"]
    assert _keys(step) == _plain_keys()


@pytest.mark.parametrize("disturb", ["torch", "python", "numpy", "data", "optimizer", "scheduler"])
def test_every_restored_piece_matters(resumed_run, disturb):
    """Without this, the equality above could hold with a piece not restored at all."""
    path, full, _ = resumed_run
    rest = _resume(path, disturb)
    assert any(not torch.equal(a, b) for a, b in zip(rest, full[K:])), f"disturbing {disturb} changed nothing"


def test_resume_under_sequence_parallelism(tmp_path):
    per_rank = launch("ckpt_sp.py", 2, path=str(tmp_path))
    for rank, res in enumerate(per_rank):
        assert res["numpy_differs_between_ranks"], "the test needs per-rank RNG streams"
        for i, (a, b) in enumerate(zip(res["resumed"], res["full"])):
            assert torch.equal(a, b), f"rank {rank} step {i}: resumed {a.item()!r} != uninterrupted {b.item()!r}"
        assert any(not torch.equal(a, b) for a, b in zip(res["with_rank0_numpy"], res["full"][K:])), \
            f"rank {rank}: giving every rank rank 0's numpy stream must change the losses"
        # The pretrained round trip under SP: same parameters, same loss, plain keys.
        assert res["pretrained_params_equal"] and res["pretrained_loss_equal"], res
    assert per_rank[0]["pretrained_keys"] == _plain_keys()
    assert per_rank[0]["resumed"][0].item() == per_rank[1]["resumed"][0].item(), "SP ranks share one loss"
    assert sorted(f for f in os.listdir(latest_checkpoint(tmp_path / "ckpt")) if f.startswith("rank")) == [
        "rank0.json", "rank0.safetensors", "rank1.json", "rank1.safetensors"]
    # One rank fails (tests/sp_workers/ckpt_sp.py rule 3): both raise, nothing is lost or changed.
    assert "writing the checkpoint of step 2" in per_rank[1]["save_error"] and "No space left" in \
        per_rank[1]["save_error"], per_rank[1]["save_error"]
    assert "another rank failed" in per_rank[0]["save_error"], per_rank[0]["save_error"]
    for res in per_rank:
        assert res["step_after_failed_save"] == 1
        assert res["root_after_failed_save"] == ["latest.json", "step-000000001"]
        assert res["model_unchanged"] and res["optimizer_unchanged"]
    assert "rank1.json is not valid JSON" in per_rank[1]["load_error"], per_rank[1]["load_error"]
    assert "another rank failed while checking" in per_rank[0]["load_error"], per_rank[0]["load_error"]


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = memo.wrap(build("llama", seed=0, num_hidden_layers=ckpt_loop.LAYERS, tie_word_embeddings=True),
                      ckpt_loop.config())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(str(tmp_path), model=model, optimizer=opt, step=0)
    fresh = memo.wrap(build("llama", seed=1, num_hidden_layers=ckpt_loop.LAYERS, tie_word_embeddings=True),
                      ckpt_loop.config())
    load_checkpoint(str(tmp_path), model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert len(_keys(latest_checkpoint(tmp_path))) == len(model.state_dict()) - 1
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


# --- bad input -------------------------------------------------------------------------------------
def test_incomplete_or_missing_checkpoint_is_refused(tmp_path, resumed_run):
    model, opt, sched = ckpt_loop.make(model_seed=0)
    with pytest.raises(memo.MemoError, match="state.json exists.*not a checkpoint"):
        load_checkpoint(str(tmp_path), model=model, optimizer=opt)
    broken = shutil.copytree(latest_checkpoint(resumed_run[0]), tmp_path / "broken")
    os.remove(broken / "rank0.json")
    with pytest.raises(memo.MemoError, match="cannot read .*rank0.json"):
        load_checkpoint(str(broken), model=model, optimizer=opt, scheduler=sched)


def test_mismatched_model_optimizer_or_world_is_refused(tmp_path, resumed_run):
    path = resumed_run[0]
    other = memo.wrap(build("llama", seed=0, intermediate_size=96), ckpt_loop.config())
    with pytest.raises(memo.MemoError, match="weights in .* do not fit this model"):
        load_checkpoint(path, model=other, optimizer=torch.optim.AdamW(other.parameters()))
    model, _, _ = ckpt_loop.make(model_seed=0)
    params = list(model.parameters())
    two_groups = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:]}])
    with pytest.raises(memo.MemoError, match="param_groups has 1 param groups, this optimizer 2.* does not fit"):
        load_checkpoint(path, model=model, optimizer=two_groups)

    moved = shutil.copytree(latest_checkpoint(path), tmp_path / "moved")
    state = json.loads((moved / "state.json").read_text())
    state["world_size"] = 2
    (moved / "state.json").write_text(json.dumps(state))
    model, opt, sched = ckpt_loop.make(model_seed=0)
    with pytest.raises(memo.MemoError, match="written by 2 processes and is loaded by 1.*resume with 2"):
        load_checkpoint(str(moved), model=model, optimizer=opt, scheduler=sched)


def test_state_that_needs_pickle_is_refused(tmp_path):
    model, opt, sched = ckpt_loop.make(model_seed=0)
    with pytest.raises(memo.MemoError, match=r"data_state/sampler is a set.*without pickle"):
        save_checkpoint(str(tmp_path), model=model, optimizer=opt, step=0, data_state={"sampler": {1, 2}})
    with pytest.raises(memo.MemoError, match="step='3' must be an int"):
        save_checkpoint(str(tmp_path), model=model, optimizer=opt, step="3")
