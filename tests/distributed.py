"""Run a worker function on N local processes over gloo (free port), and collect what each returns.

A worker file in tests/sp_workers/ defines ``main(rank: int, world: int, **kwargs) -> object``; the
launcher starts one process per rank (``python tests/distributed.py FILE``), each initialises gloo,
calls ``main``, saves the result with ``torch.save`` and exits. Many cases run per launch so that
process start-up (about 3 s each) is paid once per test module.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(AssertionError):
    pass


def launch(worker: str, world: int, *, timeout: float = 600, env: dict | None = None, **kwargs) -> list:
    """Results of ``main`` on ranks 0..world-1; raises RankFailed with every rank's stderr on failure."""
    import torch
    out = tempfile.mkdtemp(prefix="memo-dist-")
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MEMO_TEST_OUT=out, MEMO_TEST_KWARGS=json.dumps(kwargs),
                PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    base.update(env or {})
    path = os.path.join(HERE, "sp_workers", worker)
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "distributed.py"), path],
                              env=dict(base, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    deadline = time.time() + timeout
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.time()))[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            logs.append(p.communicate()[0] + "\n[killed: launcher timeout]")
    codes = [p.returncode for p in procs]
    if any(codes):
        text = "\n".join(f"--- rank {r} (exit {c}) ---\n{log[-6000:]}" for r, (c, log) in enumerate(zip(codes, logs)))
        raise RankFailed(f"{worker} failed on {world} ranks:\n{text}")
    return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def save_and_exit(rank: int, result) -> None:
    """For workers that test a dead peer: save now and leave without the closing barrier."""
    import torch
    torch.save(result, os.path.join(os.environ["MEMO_TEST_OUT"], f"{rank}.pt"))
    sys.stdout.flush()
    os._exit(0)


def _run(path: str) -> None:
    import importlib.util

    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)   # 2 cores shared by 2-4 ranks
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    spec = importlib.util.spec_from_file_location("worker", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(rank, world, **json.loads(os.environ["MEMO_TEST_KWARGS"]))
    torch.save(result, os.path.join(os.environ["MEMO_TEST_OUT"], f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _run(sys.argv[1])
