"""benchmarks/packed.py as users run it (a subprocess), at a size the suite affords: packed documents
cost no more memory than one sequence, on one process and under SP 2, measured by memo.memtrack (the
step, and memo's attention op inside, which memtrack cannot see from outside)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packed_documents_cost_no_more_memory_than_one_sequence(tmp_path):
    out = tmp_path / "packed.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "packed.py"), "--seq-len", "2048", "--docs", "1", "8",
           "--layers", "2", "--steps", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "peak+attn" in proc.stdout and "[packed] world 2: launching 2 process(es)" in proc.stderr
    rows = {(r["world"], r["docs"]): r for r in json.loads(out.read_text())["table"]}
    assert sorted(rows) == [(1, 1), (1, 8), (2, 1), (2, 8)]
    for world in (1, 2):
        one, packed = rows[(world, 1)], rows[(world, 8)]
        assert packed["packed"] and not one["packed"]
        assert packed["ranks"] == world
        # The bound (16,384 tokens in the benchmark's defaults); memo's attention op inside counted.
        assert packed["bound_vs_one_sequence"] <= 1.25, packed
        assert packed["attn_internal_bytes"] > 0
        # No time bound here: at this size and on a shared 2-core machine the ratio is noise (measured at
        # 16,384 tokens by the benchmark itself, in the closing note of issue 16).
