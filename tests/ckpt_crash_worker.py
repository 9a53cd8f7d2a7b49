"""Saves that die half-way, for tests/test_checkpoint_atomic.py.

Run as ``python tests/ckpt_crash_worker.py`` with a JSON list of trials on stdin; prints one JSON
list of results. It imports torch once with one intra-op thread (so that forking is safe) and forks
one child per trial; the child saves ``state(3)`` into a root (a copy of one prepared once) that
already holds the committed checkpoints of steps 1 and 2 and the leftovers of an earlier
interrupted save, and:

- ``{"mode": "count"}``: saves normally, counting the file-system operations of the save;
- ``{"mode": "kill", "at": k}``: SIGKILLs itself just before operation k. Writes of files are cut
  into chunks, each one operation, so a kill also lands in the middle of a file;
- ``{"mode": "delay", "seconds": t}``: each operation sleeps 2 ms; the parent SIGKILLs the child t
  seconds after the fork;
- ``{"mode": "fsize", "limit": n}``: a file-size limit of n bytes (RLIMIT_FSIZE, SIGXFSZ ignored, so
  a write past it fails with EFBIG as a full disk fails with ENOSPC).

``state(i)`` is a model, AdamW and LambdaLR after i steps on seeded gradients (element-wise maths
only, so the test process computes the same bits with any number of threads).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
OPS = {"count": 0, "kill_at": None, "sleep": 0.0}


def state(i: int):
    """(model, AdamW, LambdaLR, data_state) after i steps; about 1 MB of weights, 2 MB of optimizer state."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9 ** s)
    g = torch.Generator().manual_seed(1)
    for _ in range(i):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
    return model, opt, sched, {"cursor": i}


def save(root: str, i: int, **kw) -> None:
    from memo.integrations.checkpoint import save_checkpoint
    model, opt, sched, data = state(i)
    save_checkpoint(root, model=model, optimizer=opt, scheduler=sched, step=i, data_state=data, **kw)


def prepare(root: str) -> None:
    """Steps 1 and 2 committed, and what an interrupted save leaves (never to be loaded)."""
    shutil.rmtree(root, ignore_errors=True)
    save(root, 1)
    save(root, 2)
    os.makedirs(os.path.join(root, ".tmp-save"))
    with open(os.path.join(root, ".tmp-save", "state.json"), "w") as f:
        f.write("{garbage")
    os.makedirs(os.path.join(root, "step-000000099"))
    with open(os.path.join(root, "latest.json.tmp"), "w") as f:
        f.write('{"format": "memo-checkpoint-root", "version": 1, "checkpoints": ["step-000000099"]}')


def _op() -> None:
    OPS["count"] += 1
    if OPS["kill_at"] is not None and OPS["count"] >= OPS["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
    if OPS["sleep"]:
        time.sleep(OPS["sleep"])


def _chunks(data, n: int) -> list:
    """Exactly ``n`` pieces, so that a save has the same operations every time."""
    cuts = [len(data) * i // n for i in range(n + 1)]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def _chunked_write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        for piece in _chunks(data, 4):
            _op()
            f.write(piece)
            f.flush()


def instrument() -> None:
    """Every file-system operation of a save counts one (and may be the last)."""
    import json as json_module

    import safetensors.torch as st

    def counted(fn):
        def wrapper(*a, **k):
            _op()
            return fn(*a, **k)
        return wrapper
    for name in ("replace", "rename", "fsync", "mkdir", "makedirs", "remove"):
        setattr(os, name, counted(getattr(os, name)))
    shutil.rmtree = counted(shutil.rmtree)

    def save_file(tensors, filename, metadata=None):
        _chunked_write(filename, st.save(tensors, metadata=metadata))
    st.save_file = save_file

    def dump(obj, fp, **kw):
        for piece in _chunks(json_module.dumps(obj, **kw), 2):
            _op()
            fp.write(piece)
            fp.flush()
    json_module.dump = dump


def child(root: str, trial: dict) -> None:
    from memo.errors import MemoError
    code = 0
    try:
        if trial["mode"] == "fsize":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (trial["limit"], trial["limit"]))
            try:
                save(root, 3)
            except MemoError as e:
                code = 3 if "failed" in str(e) else 4
                sys.stderr.write(f"{e}\n")
        else:
            instrument()
            OPS["kill_at"] = trial.get("at")
            OPS["sleep"] = 0.002 if trial["mode"] == "delay" else 0.0
            save(root, 3)
            with open(os.path.join(root, "ops.txt"), "w") as f:
                f.write(str(OPS["count"]))
    except BaseException as e:   # a child must never return into the worker's loop
        sys.stderr.write(f"child failed: {e!r}\n")
        code = 5
    sys.stderr.flush()
    os._exit(code)


def run(trial: dict, template: str) -> dict:
    root = trial["root"]
    shutil.copytree(template, root)
    start = time.time()
    pid = os.fork()
    if pid == 0:
        child(root, trial)
    if trial["mode"] == "delay":
        time.sleep(trial["seconds"])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status = os.waitpid(pid, 0)
    out = {**trial, "seconds_run": time.time() - start,
           "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
           "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    ops = os.path.join(root, "ops.txt")
    if os.path.exists(ops):
        with open(ops) as f:
            out["ops"] = int(f.read())
        os.remove(ops)
    return out


def main() -> None:
    torch.set_num_threads(1)
    trials = json.load(sys.stdin)
    template = os.path.join(os.path.dirname(trials[0]["root"]), "template")
    prepare(template)
    print(json.dumps([run(t, template) for t in trials]))
    shutil.rmtree(template)


if __name__ == "__main__":
    main()
