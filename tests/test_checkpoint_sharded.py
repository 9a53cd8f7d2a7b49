"""Sharded checkpoints under FSDP2 (issue 18 item 3; NOTE [ Sharded checkpoints ] in
integrations/checkpoint_sharded.py), on 4 gloo ranks: data parallel 2 x sequence parallel 2, the
memo-wrapped tiny Llama sharded over all 4 by memo.integrations.fsdp.fully_shard, AdamW + LambdaLR,
fp32 on CPU (tests/sp_workers/fsdp_ckpt_cases.py); the resume also on a (replicate 2, shard 2) mesh.

Two launches, so the resume runs in fresh processes and a fresh process group:

1. ``first``: two steps, save (step 2), export, the third step; then a save that fails on rank 1
   inside ``dcp.save`` and a save every rank leaves by ``os._exit`` after writing its shards.
2. ``resume``: refused loads (a plain model, another optimizer class, a truncated shard) change
   nothing (and a crafted ``.metadata`` runs nothing); the load gets step 2 from the pointer (not the killed save's leftovers) and the third
   step gives the uninterrupted run's loss and parameters bit for bit; the next save removes the
   leftovers.
"""

import json
import os

import pytest
import torch

from distributed import launch
from resumed import assert_resumed_exactly

WORLD, SP = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    root, export = str(base / "root"), str(base / "export")
    first = launch("fsdp_ckpt_cases.py", WORLD, timeout=300, sp=SP, root=root, export=export, phase="first")
    resume = launch("fsdp_ckpt_cases.py", WORLD, timeout=300, sp=SP, root=root, export=export, phase="resume")
    return {"root": root, "export": export, "first": first, "resume": resume}


def test_resume_in_a_fresh_process_group_is_bit_identical(runs):
    for rank, (a, b) in enumerate(zip(runs["first"], runs["resume"])):
        assert b["loaded"] == {"step": 2, "data_state": {"cursor": 2, "rank": rank}}, b["loaded"]
        assert_resumed_exactly(a, b, f"rank {rank}")
        # The same on a (replicate 2, shard 2) mesh.
        ha, hb = a["hsdp"], b["hsdp"]
        assert_resumed_exactly(ha, hb, f"hsdp rank {rank}")
    # The control: step 3 moved the parameters (an optimizer state not restored would move them otherwise).
    a = runs["first"][0]
    assert not all(torch.equal(a["params_at_2"][n], a["params_at_3"][n]) for n in a["params_at_2"])
    # Each replica trains on its own sequence: the two ranks of a replica agree, the replicas differ.
    losses = [r["loss_3"] for r in runs["resume"]]
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[2], losses[3]) and not torch.equal(losses[0],
                                                                                                      losses[2])


def test_a_save_failing_on_one_rank_or_killed_leaves_the_previous_checkpoint(runs):
    for res in runs["first"]:
        # ENOSPC on rank 1 inside dcp.save: every rank raises, naming the rank and the cause.
        assert "failed on rank(s) [1]" in res["failed_save"] and "No space left on device" in res["failed_save"], \
            res["failed_save"]
        directory, listing = res["after_failed_save"]
        assert directory.endswith("step-000000002") and listing == ["latest.json", "step-000000002"], listing
    for res in runs["resume"]:
        # The killed save left its shards in .tmp-save (no .metadata, no commit); the load read step 2.
        assert res["listing_before"] == [".tmp-save", "latest.json", "step-000000002"], res["listing_before"]
        assert res["tmp_before"] == [f"__{r}_0.distcp" for r in range(WORLD)], res["tmp_before"]
        assert res["listing_after"] == ["latest.json", "step-000000002", "step-000000003"], res["listing_after"]
    with open(os.path.join(runs["root"], "latest.json")) as f:
        assert json.load(f)["current"] == "step-000000003"


def test_refused_loads_change_nothing(runs):
    for res in runs["resume"]:
        assert "is a sharded checkpoint (FSDP2, written by 4 ranks" in res["plain_model"], res["plain_model"]
        assert "memo.integrations.fsdp.fully_shard" in res["plain_model"]
        assert "field optimizer_class is 'torch.optim.adamw.AdamW'" in res["sgd"], res["sgd"]
        # Rank 1's shard is truncated: every rank refuses (DCP reads collectively), naming the directory.
        assert "cannot read the shards in" in res["corrupt"] and "-corrupt" in res["corrupt"], res["corrupt"]
        # A crafted .metadata (a pickle calling os.mkdir) is refused without running it (NOTE [ Sharded
        # checkpoints ] rule 5).
        assert "is not DCP metadata" in res["crafted"] and "posix.mkdir is not one of DCP's" in res["crafted"], \
            res["crafted"]
        assert not res["crafted_ran"]
        assert res["unchanged_after_refusals"], "a refused load changed the model or the optimizer"


def test_export_loads_as_a_plain_model_with_the_gathered_weights(runs):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    export = runs["export"]
    with safe_open(os.path.join(export, "model.safetensors"), "pt") as f:
        assert f.keys(), "no weights exported"
    with open(os.path.join(export, "config.json")) as f:
        assert "memo" not in f.read(), "memo's attention implementation must not be saved in the config"
    model = AutoModelForCausalLM.from_pretrained(export)
    gathered = runs["first"][0]["params_at_2"]
    got = dict(model.named_parameters())
    assert got.keys() == gathered.keys()
    for n, p in got.items():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), gathered[n]), n


def test_export_refuses_a_model_fsdp2_does_not_shard():
    from memo import MemoError
    from memo.integrations.checkpoint import export_pretrained
    from models import build
    with pytest.raises(MemoError, match=r"not sharded by FSDP2 or partitioned by DeepSpeed ZeRO-3 \(got "
                                        r"LlamaForCausalLM\); for an unsharded HF model "
                                        r"call model.save_pretrained\(directory\) on rank 0"):
        export_pretrained(build("llama"), "/nonexistent/export")


# NOTE [ Atomic export ], on rank 0's part (``_export_atomically``), with a plain model's state dict.
_EXPORT_CHILD = """
import os, resource, signal, sys
sys.path.insert(0, {tests!r})
from memo.integrations.checkpoint_sharded import _export_atomically
from models import build
model = build("llama", seed=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
_export_atomically(model, model.state_dict(), {directory!r})
"""


def _weights(directory):
    from safetensors.torch import load_file
    return load_file(os.path.join(directory, "model.safetensors"))


def test_an_export_replaces_the_previous_one_whole_or_not_at_all(tmp_path):
    import subprocess
    import sys

    from memo import MemoError
    from memo.integrations.checkpoint_sharded import _export_atomically
    from models import build
    directory = str(tmp_path / "export")
    first, second = build("llama", seed=0), build("llama", seed=1)
    _export_atomically(first, first.state_dict(), directory)
    old = _weights(directory)

    def export_stopped_by_a_file_size_limit():   # in a child process
        child = subprocess.run([sys.executable, "-c", _EXPORT_CHILD.format(tests=os.path.dirname(__file__),
                                                                             directory=directory)],
                               capture_output=True, text=True, timeout=120)
        assert child.returncode != 0 and "File too large" in child.stderr, child.stderr[-2000:]

    # Stopped half-way: the previous export is there, whole.
    export_stopped_by_a_file_size_limit()
    assert all(torch.equal(old[k], v) for k, v in _weights(directory).items())
    # An export cut between its two renames (the old one moved aside, the new one not yet in place), then
    # an export that fails: the old one was put back first, whole.
    os.rename(directory, directory + ".old-export")
    export_stopped_by_a_file_size_limit()
    assert all(torch.equal(old[k], v) for k, v in _weights(directory).items())
    # And a complete export replaces it; nothing is left beside the directory.
    _export_atomically(second, second.state_dict(), directory)
    new = _weights(directory)
    assert all(torch.equal(new[k], v) for k, v in second.state_dict().items() if k in new)
    assert not torch.equal(new["lm_head.weight"], old["lm_head.weight"])
    assert sorted(os.listdir(tmp_path)) == ["export"]
    # Files the export does not write (a tokenizer's) stay; stale weight shards of an earlier export go.
    (tmp_path / "export" / "tokenizer.json").write_text("{}")
    (tmp_path / "export" / "model-00001-of-00002.safetensors").write_text("stale")
    _export_atomically(first, first.state_dict(), directory)
    assert sorted(os.listdir(directory)) == ["config.json", "generation_config.json", "model.safetensors",
                                             "tokenizer.json"]
    # A path that is a file is refused and left as it is.
    (tmp_path / "notes.txt").write_text("keep")
    with pytest.raises(MemoError, match="exists and is not a directory"):
        _export_atomically(second, second.state_dict(), str(tmp_path / "notes.txt"))
    assert (tmp_path / "notes.txt").read_text() == "keep"
