"""Checked, transactional loads (issue 18 item 2; NOTE [ Checked loads ] in integrations/checkpoint_checks.py).

Each case corrupts or edits one file of a real checkpoint (AdamW + LambdaLR, step 2), or loads it into
objects it does not fit, and asserts: a MemoError whose message names the file and the field,
raised from the exception it wraps where there is one, and a live model, optimizer, scheduler and
RNG state exactly as before the load (they were trained one step first, so a partial load would
show).
"""

import copy
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch

import memo
from memo.integrations.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memo.integrations.checkpoint_checks import STATE_KEYS
from sp_workers import ckpt_loop


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt"))
    ckpt_loop.seed_all(0)
    model, opt, sched = ckpt_loop.make(model_seed=0)
    data = {"cursor": 0}
    ckpt_loop.train(model, opt, sched, 2, data)
    save_checkpoint(root, model=model, optimizer=opt, scheduler=sched, step=2, data_state=data)
    return root


def _live(optimizer="adamw"):
    """Objects trained one step (so every piece of state is non-trivial), and their snapshot."""
    ckpt_loop.seed_all(5)
    model, opt, sched = ckpt_loop.make(model_seed=7)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    ckpt_loop.train(model, opt, sched, 1, {"cursor": 0})
    return model, opt, sched


def _snapshot(model, opt, sched):
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()), torch.get_rng_state(), random.getstate(),
            np.random.get_state()[1].copy())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _edit_json(name, change):
    def edit(step_dir):
        path = os.path.join(step_dir, name)
        with open(path) as f:
            data = json.load(f)
        change(data)
        with open(path, "w") as f:
            json.dump(data, f)
    return edit


def _truncate(name):
    def edit(step_dir):
        path = os.path.join(step_dir, name)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return edit


def _write(name, data: bytes):
    def edit(step_dir):
        with open(os.path.join(step_dir, name), "wb") as f:
            f.write(data)
    return edit


def _lr(group, value):
    return _edit_json("state.json", lambda s: s["optimizer"]["param_groups"][group].__setitem__("lr", value))


def _numpy_keys(s):
    s["rng"]["numpy"]["__memo_tuple__"][1] = s["rng"]["numpy"]["__memo_tuple__"][1][:10]


def _drop_tensor(s):
    s["optimizer"]["state"]["__memo_items__"][0][1]["exp_avg"] = {"__memo_tensor__": "no-such-tensor"}


# (edit of the step directory, optimizer kind, file named, words of the message, wrapped exception type)
CASES = {
    "truncated weights": (_truncate("model.safetensors"), "adamw", "model.safetensors",
                          ["not a readable safetensors file"], Exception),
    "truncated state tensors": (_truncate("state.safetensors"), "adamw", "state.safetensors",
                                ["not a readable safetensors file"], Exception),
    "garbage weights": (_write("model.safetensors", b"\x00" * 64), "adamw", "model.safetensors",
                        ["not a readable safetensors file"], Exception),
    "bad json": (_write("state.json", b'{"format": "memo-checkpoint", "step": '), "adamw", "state.json",
                 ["not valid JSON"], json.JSONDecodeError),
    "binary json": (_write("rank0.json", b"\xff\xfe\x00garbage"), "adamw", "rank0.json", ["not valid JSON"],
                    UnicodeDecodeError),
    "step hello": (_edit_json("state.json", lambda s: s.__setitem__("step", "hello")), "adamw", "state.json",
                   ["field step is 'hello'", "int >= 0"], None),
    "step NaN": (_edit_json("state.json", lambda s: s.__setitem__("step", float("nan"))), "adamw", "state.json",
                 ["field step is nan"], None),
    "step negative": (_edit_json("state.json", lambda s: s.__setitem__("step", -3)), "adamw", "state.json",
                      ["field step is -3"], None),
    "step missing": (_edit_json("state.json", lambda s: s.pop("step")), "adamw", "state.json",
                     ["field step is missing"], None),
    "lr abc": (_lr(0, "abc"), "adamw", "state.json", ["field optimizer/param_groups/0/lr is 'abc'", "not a number"],
               None),
    "lr inf": (_lr(0, float("inf")), "adamw", "state.json", ["optimizer/param_groups/0/lr is inf", "not a finite"],
               None),
    "betas too long": (_edit_json("state.json", lambda s: s["optimizer"]["param_groups"][0]["betas"][
                           "__memo_tuple__"].append(0.5)), "adamw", "state.json",
                       ["optimizer/param_groups/0/betas", "not a sequence of 2"], None),
    "amsgrad not a bool": (_edit_json("state.json", lambda s: s["optimizer"]["param_groups"][0].__setitem__(
                               "amsgrad", "yes")), "adamw", "state.json",
                           ["optimizer/param_groups/0/amsgrad is 'yes'", "not a bool"], None),
    "group sizes": (_edit_json("state.json", lambda s: s["optimizer"]["param_groups"][0]["params"].pop()), "adamw",
                    "state.json", ["optimizer/param_groups/0/params holds", "parameter ids"], None),
    "state of an unknown parameter": (_edit_json("state.json", lambda s: s["optimizer"]["state"]["__memo_items__"][0]
                                                 .__setitem__(0, 999)), "adamw", "state.json",
                                      ["optimizer/state/999", "no param group lists"], None),
    "missing tensor": (_edit_json("state.json", _drop_tensor), "adamw", "state.json",
                       ["optimizer/state/0/exp_avg refers to tensor 'no-such-tensor'"], None),
    "AdamW state into SGD": (None, "sgd", "state.json", ["field optimizer_class", "AdamW", "SGD"], None),
    "AdamW state into SGD, class not recorded": (
        _edit_json("state.json", lambda s: s.pop("optimizer_class")), "sgd", "state.json",
        ["field optimizer/state/0", "'exp_avg'", "SGD does not keep"], None),
    "scheduler last_epoch": (_edit_json("state.json", lambda s: s["scheduler"].__setitem__("last_epoch", "x")),
                             "adamw", "state.json", ["field scheduler/last_epoch is 'x'"], None),
    "scheduler keys": (_edit_json("state.json", lambda s: s["scheduler"].pop("base_lrs")), "adamw", "state.json",
                       ["field scheduler has keys"], None),
    "scheduler lr list": (_edit_json("state.json", lambda s: s["scheduler"].__setitem__("_last_lr", [1e-3, 2e-3])),
                          "adamw", "state.json", ["field scheduler/_last_lr", "not a sequence of 1"], None),
    "numpy state": (_edit_json("rank0.json", _numpy_keys), "adamw", "rank0.json",
                    ["field rng/numpy", "not a numpy random state"], Exception),
    "python state": (_edit_json("rank0.json", lambda s: s["rng"].__setitem__("python", "abc")), "adamw",
                     "rank0.json", ["field rng/python", "not a python random state"], Exception),
    "rank number": (_edit_json("rank0.json", lambda s: s.__setitem__("rank", 1)), "adamw", "rank0.json",
                    ["field rank is 1", "this rank's 0"], None),
    "world size": (_edit_json("state.json", lambda s: s.__setitem__("world_size", "two")), "adamw", "state.json",
                   ["field world_size is 'two'"], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_file_is_refused_by_name_and_field_and_nothing_changes(tmp_path, saved, case):
    edit, kind, file, words, cause = CASES[case]
    step_dir = str(shutil.copytree(latest_checkpoint(saved), tmp_path / "step"))
    if edit is not None:
        edit(step_dir)
    model, opt, sched = _live(kind)
    before = _snapshot(model, opt, sched)
    with pytest.raises(memo.MemoError) as e:
        load_checkpoint(step_dir, model=model, optimizer=opt, scheduler=sched)
    message = str(e.value)
    assert os.path.join(step_dir, file) in message, message
    for w in words:
        assert w in message, message
    if cause is not None:
        assert isinstance(e.value.__cause__, cause), repr(e.value.__cause__)
    assert _same(before, _snapshot(model, opt, sched)), f"{case}: the failed load changed the live objects"


def test_weights_of_another_dtype_or_shape_are_refused_before_anything_changes(saved):
    model, opt, sched = _live()
    model.double()
    before = _snapshot(model, opt, sched)
    with pytest.raises(memo.MemoError, match=r"model.safetensors do not fit this model: field .* torch.float32 "
                                             r"tensor .* the model's a torch.float64"):
        load_checkpoint(saved, model=model, optimizer=opt, scheduler=sched)
    assert _same(before, _snapshot(model, opt, sched))


def test_a_good_checkpoint_still_loads_after_the_failed_attempts(saved):
    model, opt, sched = _live()
    state = load_checkpoint(saved, model=model, optimizer=opt, scheduler=sched)
    assert state == {"step": 2, "data_state": {"cursor": 2 * ckpt_loop.SEQ}}


def test_the_state_key_table_matches_torch_optim():
    """STATE_KEYS must list every key each torch.optim class keeps (with its options that add keys)."""
    options = {"SGD": {"momentum": 0.9}, "Adam": {"amsgrad": True}, "AdamW": {"amsgrad": True},
               "RMSprop": {"momentum": 0.9, "centered": True}}
    for name, keys in STATE_KEYS.items():
        cls = getattr(torch.optim, name, None)
        if cls is None:
            continue
        p = torch.nn.Parameter(torch.randn(3, 4))
        opt = cls([p], lr=0.01, **options.get(name, {}))
        p.grad = torch.randn(3, 4)
        opt.step()
        assert set(opt.state[p]) == keys, (name, set(opt.state[p]))
