"""Smoke test of benchmarks/swap.py: tiny sizes, run as users run it (a subprocess)."""

import json
import os
import subprocess
import sys

import memo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"method", "seq_len", "step_s", "ratio", "resident_bytes", "host_bytes"}


def test_swap_benchmark_rows_and_schema(tmp_path):
    out = tmp_path / "swap.json"
    # 3 layers: with memo's default keep_last_layers=2, layer 0 is swapped. One thread: on a shared
    # 2-core machine a second OpenMP thread makes these millisecond steps wait on a busy core.
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "swap.py"), "--seq-lens", "256", "--layers", "3",
           "--hidden", "64", "--vocab", "128", "--steps", "3", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method" in proc.stdout and "resident" in proc.stdout      # the table goes to stdout
    assert "none seq 256: build + warm-up" in proc.stderr             # progress goes to stderr

    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    expected = ["none", "hf-checkpoint", "hf-checkpoint-every-2", "save-on-cpu"]
    assert hasattr(memo, "wrap"), "memo.wrap exists now: the memo rows are required"
    expected += ["memo-0.0", "memo-0.5", "memo-1.0"]
    assert [r["method"] for r in data["results"]] == expected
    for r in data["results"]:
        assert KEYS <= set(r), r
        assert r["seq_len"] == 256 and r["step_s"] > 0 and r["ratio"] > 0
        assert isinstance(r["resident_bytes"], int) and isinstance(r["host_bytes"], int)
        assert len(r["step_times_s"]) == 3
        # Same weights and tokens in every row: the first step's loss is the same function value.
        assert abs(r["first_loss"] - rows["none"]["first_loss"]) < 1e-5
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["host_bytes"] == 0

    none = rows["none"]["resident_bytes"]
    assert none > 0
    assert rows["hf-checkpoint"]["resident_bytes"] < rows["hf-checkpoint-every-2"]["resident_bytes"] < none
    # save_on_cpu on CPU keeps the activations themselves, accounted as host (see the NOTE in the script).
    assert rows["save-on-cpu"]["host_bytes"] > none / 2
    assert rows["save-on-cpu"]["resident_bytes"] < none / 4
    # memo: more swapped tokens, more host bytes; swapped or recomputed layers are not resident.
    assert 0 < rows["memo-0.0"]["host_bytes"] < rows["memo-0.5"]["host_bytes"] < rows["memo-1.0"]["host_bytes"]
    for r in ("memo-0.0", "memo-0.5", "memo-1.0"):
        assert rows[r]["resident_bytes"] < none
        assert rows[r]["host_reserved_bytes"] >= rows[r]["host_bytes"]
