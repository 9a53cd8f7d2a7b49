"""benchmarks/final_norm.py as users run it (a subprocess), at a size the suite affords: the final norm
fused into the chunked loss cuts the LM head + loss block's peak (memo.memtrack), same loss."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_fused_final_norm_cuts_the_head_block_peak(tmp_path):
    out = tmp_path / "final_norm.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "final_norm.py"), "--seq-len", "4096", "--hidden", "256",
           "--vocab", "512", "--chunk", "512", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak MiB" in proc.stdout and "[final_norm] fused: warm up" in proc.stderr
    data = json.loads(out.read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["norm first", "fused"]
    assert rows["fused"]["loss"] == rows["norm first"]["loss"]
    # The normed output, its gradient and the norm's fp32 intermediates: 3.0 sequence tensors fewer at the
    # defaults (32K tokens), 2.86 at this size, where the chunk-sized temporaries weigh more.
    saved = rows["norm first"]["peak_bytes"] - rows["fused"]["peak_bytes"]
    assert saved >= 2.5 * data["sequence_tensor_bytes"], (saved, data["sequence_tensor_bytes"])
