"""Atomic checkpoints (issue 18 item 1; NOTE [ Atomic checkpoint commit ] in integrations/checkpoint.py).

1. A save killed (SIGKILL) before each of its file-system operations in turn, writes cut into
   chunks so that kills also land inside files, and at random moments: the root always loads whole,
   as the previous checkpoint or the new one, bit-identical; the next save removes the leftovers.
2. A file-size limit (RLIMIT_FSIZE) that stops the save in each of its files: the save raises a
   MemoError, removes its temporary directory, and the previous checkpoint loads whole.
3. Layout: ``keep``, a step saved twice, a directory of the old layout, bad ``latest.json``.

The saves run in children of tests/ckpt_crash_worker.py (forked from one process that imported
torch once); the loads run here.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import memo
from ckpt_crash_worker import prepare, save, state
from memo.integrations.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "ckpt_crash_worker.py")


@pytest.fixture(autouse=True)
def keep_rng():
    """A load sets this process's RNG states; give them back."""
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])


@pytest.fixture
def no_fsync(monkeypatch):
    """The saves of this process skip fsync: it only matters on power loss, which no test here simulates,
    and it is most of a save's time. The children of the worker, whose saves are the ones killed, fsync."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _worker(trials: list, timeout: float = 300) -> list:
    run = subprocess.run([sys.executable, WORKER], input=json.dumps(trials), capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])))
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


_REFERENCE: dict = {}


def _reference(step: int) -> tuple:
    if step not in _REFERENCE:
        model, opt, sched, data = state(step)
        _REFERENCE[step] = (model.state_dict(), opt.state_dict(), sched.state_dict(), data)
    return _REFERENCE[step]


def _loads_whole(root: str) -> int:
    """The step ``root`` loads as, after checking every tensor is bit-identical to that step's state."""
    model, opt, sched, _ = state(0)
    got = load_checkpoint(root, model=model, optimizer=opt, scheduler=sched)
    ref_model, ref_opt, ref_sched, ref_data = _reference(got["step"])
    assert got["data_state"] == ref_data
    assert _same(model.state_dict(), ref_model), f"step {got['step']}: weights differ"
    assert _same(opt.state_dict(), ref_opt), f"step {got['step']}: optimizer state differs"
    assert _same(sched.state_dict(), ref_sched), f"step {got['step']}: scheduler state differs"
    return got["step"]


def _next_save_cleans_up(root: str, before: int) -> None:
    """A save after a failed one succeeds and leaves the root clean: latest.json and two step directories."""
    save(root, 4)
    names = sorted(os.listdir(root))
    assert names == ["latest.json", f"step-{before:09d}", "step-000000004"], names
    assert _loads_whole(root) == 4


def _check_killed(trials: list) -> dict:
    outcomes = {2: 0, 3: 0}
    for t in trials:
        assert t["signal"] == signal.SIGKILL or t["exit"] == 0, t
        step = _loads_whole(t["root"])
        assert step in (2, 3), (t, step)
        if t["signal"] is None:
            assert step == 3, "a save that returned must be current"
        outcomes[step] += 1
        _next_save_cleans_up(t["root"], step)
    return outcomes


def test_a_save_killed_before_any_of_its_operations_leaves_the_old_or_the_new_checkpoint_whole(tmp_path, no_fsync):
    [count] = _worker([{"mode": "count", "root": str(tmp_path / "count")}])
    assert count["exit"] == 0 and _loads_whole(count["root"]) == 3
    n = count["ops"]
    assert n >= 20, f"the save has only {n} operations to kill at"
    trials = _worker([{"mode": "kill", "at": k, "root": str(tmp_path / f"kill{k}")} for k in range(1, n + 1)])
    assert all(t["signal"] == signal.SIGKILL for t in trials), [t for t in trials if t["signal"] is None]
    outcomes = _check_killed(trials)
    print(f"\nkilled before each of {n} operations: {outcomes[2]} loaded the old checkpoint, {outcomes[3]} the new; "
          f"0 unloadable")
    assert outcomes[2] and outcomes[3], outcomes


def test_a_save_killed_at_random_moments_leaves_the_old_or_the_new_checkpoint_whole(tmp_path, no_fsync):
    rng = random.Random(18)
    trials = _worker([{"mode": "delay", "seconds": rng.uniform(0.0, 0.25), "root": str(tmp_path / f"delay{i}")}
                      for i in range(12)])
    outcomes = _check_killed(trials)
    print(f"\nkilled after random delays: {outcomes[2]} old, {outcomes[3]} new, 0 unloadable")


def test_a_file_size_limit_fails_the_save_and_the_old_checkpoint_still_loads(tmp_path, no_fsync):
    """Limits that stop the save in a rank file, the weights, the optimizer state; and one above all files."""
    limits = [100, 4096, 64 * 1024, 1536 * 1024, 64 * 1024 * 1024]
    trials = _worker([{"mode": "fsize", "limit": n, "root": str(tmp_path / f"limit{n}")} for n in limits])
    for t in trials[:-1]:
        assert t["exit"] == 3, f"the save must raise a MemoError saying what failed: {t}"
        assert ".tmp-save" not in os.listdir(t["root"]), "a failed save removes its temporary directory"
        assert _loads_whole(t["root"]) == 2
        _next_save_cleans_up(t["root"], 2)
    assert trials[-1]["exit"] == 0 and _loads_whole(trials[-1]["root"]) == 3, trials[-1]


# --- layout ----------------------------------------------------------------------------------------
def test_keep_the_last_n_and_a_step_saved_twice(tmp_path):
    root = str(tmp_path)
    for i in range(1, 5):
        assert save_checkpoint_dir(root, i) == os.path.join(root, f"step-{i:09d}")
    assert sorted(os.listdir(root)) == ["latest.json", "step-000000003", "step-000000004"]
    save(root, 4, keep=3)
    assert sorted(os.listdir(root)) == ["latest.json", "step-000000003", "step-000000004", "step-000000004-1"]
    assert latest_checkpoint(root) == os.path.join(root, "step-000000004-1") and _loads_whole(root) == 4
    save(root, 1, keep=1)
    assert sorted(os.listdir(root)) == ["latest.json", "step-000000001"] and _loads_whole(root) == 1
    model, opt, sched, _ = state(0)
    for keep in (0, True, "2", -1):
        with pytest.raises(memo.MemoError, match=r"keep=.* must be an int >= 1"):
            save_checkpoint(root, model=model, optimizer=opt, step=2, keep=keep)
    with pytest.raises(memo.MemoError, match=r"step=-1 must be an int >= 0"):
        save_checkpoint(root, model=model, optimizer=opt, step=-1)


def save_checkpoint_dir(root: str, i: int) -> str:
    model, opt, sched, data = state(i)
    return save_checkpoint(root, model=model, optimizer=opt, scheduler=sched, step=i, data_state=data)


def test_a_directory_of_the_old_layout_still_loads_and_a_save_into_it_becomes_current(tmp_path):
    save(str(tmp_path / "new"), 2)
    old = tmp_path / "old"
    shutil.copytree(latest_checkpoint(str(tmp_path / "new")), old)   # state.json at the top: the old layout
    assert _loads_whole(str(old)) == 2
    save(str(old), 3)
    assert _loads_whole(str(old)) == 3 and (old / "state.json").exists()


def test_leftovers_are_never_loaded(tmp_path):
    root = str(tmp_path)
    prepare(root)   # steps 1 and 2, a garbage .tmp-save, an unlisted step-000000099, a latest.json.tmp
    assert _loads_whole(root) == 2


@pytest.mark.parametrize("latest", [
    '{"format": "memo-checkpoint-root", "version": 1, "checkpoints": ["../elsewhere"]}',
    '{"format": "memo-checkpoint-root", "version": 1, "checkpoints": []}',
    '{"format": "something", "version": 1, "checkpoints": ["step-000000002"]}',
    '{"format": "memo-checkpoint-root", "vers',
])
def test_an_edited_latest_json_is_refused_by_name(tmp_path, latest):
    root = str(tmp_path)
    save(root, 2)
    (tmp_path / "latest.json").write_text(latest)
    model, opt, sched, _ = state(0)
    with pytest.raises(memo.MemoError, match=r"latest.json (is not a memo-checkpoint-root|is not valid JSON)"):
        load_checkpoint(root, model=model, optimizer=opt, scheduler=sched)
    with pytest.raises(memo.MemoError, match="latest.json"):
        save(root, 3)


def test_a_current_directory_removed_by_hand_is_reported(tmp_path):
    root = str(tmp_path)
    save(root, 2)
    shutil.rmtree(latest_checkpoint(root))
    model, opt, sched, _ = state(0)
    with pytest.raises(memo.MemoError, match="names step-000000002, but .*state.json does not exist"):
        load_checkpoint(root, model=model, optimizer=opt, scheduler=sched)
