"""benchmarks/gpu_step.py as users run it (subprocesses): the CPU stand-in mode's JSON and table,
the refusal without a GPU, and the compute-stream gap summary."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_step.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from gpu_step import stream_gaps  # noqa: E402

ROW_KEYS = {"shape", "seq", "method", "status", "step_s", "step_times_s", "peak_allocated_bytes",
            "peak_reserved_bytes", "mfu", "time_vs_none", "time_vs_hf-ckpt", "peak_vs_none"}


def test_cpu_tiny_rows_json_and_table(tmp_path):
    out = tmp_path / "gpu_step.json"
    # Two rows (each its own process): the baseline and memo at ratio 0, with its profiled step.
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--tiny", "--methods", "none", "memo-0",
                           "--steps", "1", "--warmup", "0", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[2/2] tiny 256 tokens, memo-0" in proc.stderr and "gpu_step: tiny 256 memo-0: step 1 " in proc.stderr and "(1/1 timed)" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:4] == ["shape", "tokens", "method", "step"]
    assert [ln.split()[2] for ln in lines[2:]] == ["none", "memo-0"]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["none", "memo-0"] and data["meta"]["device"] == "cpu"
    for r in rows.values():
        assert ROW_KEYS <= set(r) and r["status"] == "ok" and r["seq"] == 256 and r["step_s"] > 0
        assert r["peak_allocated_bytes"] is None and r["mfu"] is None     # no GPU counters, no GPU peak
    assert rows["none"]["time_vs_none"] == 1.0
    assert rows["memo-0"]["time_vs_none"] == pytest.approx(rows["memo-0"]["step_s"] / rows["none"]["step_s"])
    assert rows["memo-0"]["swap_ratio"] == 0.0 and "profile" not in rows["none"]
    prof = rows["memo-0"]["profile"]
    assert prof["kernels"] > 0 and 0 <= prof["idle_s"] <= prof["span_s"]
    assert prof["busy_s"] + prof["idle_s"] == pytest.approx(prof["span_s"], rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_default_run_exits_2_and_says_why():
    proc = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert "no CUDA GPU here" in proc.stderr and "--device cpu --tiny" in proc.stderr


def test_stream_gaps_sums_idle_time_between_overlapping_kernels():
    ms = 1e-3
    # Kernel [1, 2] runs inside [0, 3]; then a 2 ms gap, a 0.01 ms one (launch latency: idle, not listed).
    s = stream_gaps([(5 * ms, 6 * ms), (0, 3 * ms), (1 * ms, 2 * ms), (6.01 * ms, 7 * ms)], layer_phases=2)
    assert s["busy_s"] == pytest.approx(4.99 * ms) and s["idle_s"] == pytest.approx(2.01 * ms)
    assert s["span_s"] == pytest.approx(7 * ms) and s["longest_gap_s"] == pytest.approx(2 * ms)
    assert s["top_gaps_s"] == [pytest.approx(2 * ms)] and s["gaps_over_1ms_per_layer"] == 0.5
