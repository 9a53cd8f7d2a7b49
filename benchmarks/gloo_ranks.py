"""Start a benchmark script's worker on N local gloo processes (free port, one process per rank).

The scripts in benchmarks/ run as ``python benchmarks/x.py`` and move their own folder from the front
of sys.path to its end (benchmarks/copy.py would shadow the standard library's copy module), then
``from gloo_ranks import run_ranks``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmd: list[str], world: int, what: str, out: str) -> list:
    """Run ``cmd`` once per rank with RANK/WORLD_SIZE/MASTER_* set; the rows every rank wrote to
    ``out/<rank>.json`` (a JSON list), in rank order. SystemExit naming ``what`` if a rank fails."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world),
               LOCAL_WORLD_SIZE=str(world))
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{what}: world {world} failed with exit codes {codes}")
    rows = []
    for r in range(world):
        with open(os.path.join(out, f"{r}.json")) as f:
            rows.extend(json.load(f))
    return rows
