"""examples/train_long_context.py, the main job, through `memo launch` with 2 CPU processes (SP 2, swapping)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_long_context.py")
CONFIG = os.path.join(ROOT, "examples", "accelerate", "memo_cpu.yaml")


def _launch(out, *extra, timeout=600):
    cmd = [sys.executable, "-m", "memo.cli.main", "launch", "--config_file", CONFIG, EXAMPLE, "--out", str(out),
           "--seq-len", "128", "--batch-size", "4", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f), res


def test_a_run_writes_summary_plot_and_checkpoint_and_resumes_with_the_same_losses(tmp_path):
    full, res = _launch(tmp_path / "full", "--max-steps", "4")
    assert full["world"] == 2 and full["sequence_parallel"] == 2 and full["steps"] == 4
    assert all(math.isfinite(h["loss"]) and 0 <= h["accuracy"] <= 1 for h in full["history"])
    assert all(h["swapped_bytes"] > 0 and h["tokens_per_s"] > 0 for h in full["history"])
    assert full["memo"]["swap_ratio"] == 0.5        # from the yaml's memo: section
    assert os.path.getsize(tmp_path / "full" / "training.png") > 10_000
    from memo.integrations.checkpoint import latest_checkpoint
    assert os.path.exists(os.path.join(latest_checkpoint(str(tmp_path / "full" / "checkpoint")), "model.safetensors"))
    assert "retrieval accuracy" in res.stdout
    # interrupted after 2 steps, then resumed from its checkpoint in new processes
    _launch(tmp_path / "cut", "--max-steps", "4", "--stop-after", "2")
    resumed, _ = _launch(tmp_path / "cut", "--max-steps", "4", "--resume", str(tmp_path / "cut" / "checkpoint"))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]


@pytest.mark.slow
def test_the_model_learns_to_retrieve_from_far_back(tmp_path):
    """`make demo`'s run: the answer's loss falls well below chance (ln 16) only by attending across ranks."""
    summary, _ = _launch(tmp_path, "--max-steps", "150", "--seq-len", "512", "--batch-size", "32", timeout=1200)
    assert summary["final_loss"] < 0.6 * summary["chance_loss"], summary["final_loss"]
    assert summary["final_accuracy"] > 4 * summary["chance_accuracy"], summary["final_accuracy"]
