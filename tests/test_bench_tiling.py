"""benchmarks/tiling.py as users run it (a subprocess), at a size the suite affords: tiling the MLP
cuts one step's activation peak, measured by memo.memtrack (not by memo's own counters)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiling_cuts_the_step_peak(tmp_path):
    out = tmp_path / "tiling.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "tiling.py"), "--seq-len", "4096", "--hidden", "128",
           "--tiles", "512", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak MiB" in proc.stdout and "[tiling] untiled: build and warm up" in proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["untiled", "tile-512", "auto"]
    assert rows["tile-512"]["tile_tokens"] == 512 and rows["untiled"]["tile_tokens"] is None
    assert rows["auto"]["tile_tokens"] is None   # 4096 tokens: no longer than auto's smallest tile
    # The bound (8192 tokens in the benchmark's defaults; 0.28x at both sizes when measured).
    assert rows["tile-512"]["peak_vs_untiled"] <= 0.45, rows
    # Time is noisy on a shared 2-core machine; the benchmark's own figure is the claim.
    assert rows["tile-512"]["time_vs_untiled"] <= 2.0, rows
