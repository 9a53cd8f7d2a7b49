"""Sharded checkpoints under DeepSpeed ZeRO (issue 18 item 3; NOTE [ ZeRO checkpoints ] in
integrations/checkpoint_zero.py), on 4 gloo ranks: data parallel 2 x sequence parallel 2 inside one
ZeRO engine (memo.integrations.deepspeed.initialize), the memo-wrapped tiny Llama with its token
embedding and final norm frozen, torch AdamW + LambdaLR, fp32 on CPU (tests/sp_workers/zero_ckpt_cases.py).
ZeRO-3 in full; ZeRO stage 1 (whole weights, partitioned optimizer state), ZeRO-3 with weights and
optimizer offloaded to the host (DeepSpeed's CPU offload), ZeRO-1 in bf16 and ZeRO-3 in fp16 with a
dynamic loss scaler for the resume, stage 1 also for refusals.

Two launches, so the resume runs in fresh processes and a fresh process group:

1. ``first``: two steps, save (step 2), export, the third step, a second export over another; then a
   save that fails on rank 1 (a file-size limit) and a save every rank leaves by ``os._exit`` after
   writing its partition.
2. ``resume``: refused loads (a plain model, an SGD optimizer, the torch optimizer in place of the
   engine's, a truncated partition, an edited learning rate) change nothing; the load gets step 2
   from the pointer (not the killed save's leftovers) and the third step gives the uninterrupted
   run's loss and parameters bit for bit; the next save removes the leftovers.
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
    base = tmp_path_factory.mktemp("zero")
    root, export = str(base / "root"), str(base / "export")
    first = launch("zero_ckpt_cases.py", WORLD, timeout=300, sp=SP, root=root, export=export, phase="first")
    resume = launch("zero_ckpt_cases.py", WORLD, timeout=300, sp=SP, root=root, export=export, phase="resume")
    return {"root": root, "export": export, "first": first, "resume": resume}


def test_resume_in_a_fresh_process_group_is_bit_identical(runs):
    for rank, (a, b) in enumerate(zip(runs["first"], runs["resume"])):
        assert b["loaded"] == {"step": 2, "data_state": {"cursor": 2, "rank": rank}}, b["loaded"]
        assert b["counters"] == (2, 4.0, 2), b["counters"]   # the engine's global_steps, samples, micro steps
        assert_resumed_exactly(a, b, f"rank {rank}")
    a, b = runs["first"][0], runs["resume"][0]
    # The frozen embedding (not in the optimizer) was built otherwise in the resumed run and came back from
    # the ranks' frozen partitions; the trained parameters moved in step 3.
    embed = "model.embed_tokens.weight"
    assert not torch.equal(b["embedding_before_load"], a["params_at_2"][embed])
    assert torch.equal(a["params_at_2"][embed], a["params_at_3"][embed])
    assert not all(torch.equal(a["params_at_2"][n], a["params_at_3"][n]) for n in a["params_at_2"])
    # Each replica trains on its own sequence: the two ranks of a replica agree, the replicas differ.
    losses = [r["loss_3"] for r in runs["resume"]]
    assert torch.equal(losses[0], losses[1]) and torch.equal(losses[2], losses[3]) and not torch.equal(losses[0],
                                                                                                      losses[2])


def test_the_step_directory_holds_every_ranks_partition_and_no_pickle(runs):
    files = runs["first"][0]["files"]
    assert files == sorted(["config.json", "state.json", "state.safetensors"]
                           + [f"{kind}{r}.{ext}" for kind in ("rank", "zero") for r in range(WORLD)
                              for ext in ("json", "safetensors")]), files
    with open(os.path.join(runs["first"][0]["saved_dir"], "state.json")) as f:
        state = json.load(f)
    assert state["optimizer_layout"] == "zero" and state["zero_stage"] == 3 and state["world_size"] == WORLD
    assert state["optimizer"] is None   # every rank's partition holds its optimizer state


def test_a_save_failing_on_one_rank_or_killed_leaves_the_previous_checkpoint(runs):
    for res in runs["first"]:
        # EFBIG on rank 1 while it writes its partition: every rank raises; rank 1 names the cause.
        assert "failed" in res["failed_save"] and "previous checkpoint is unchanged" in res["failed_save"], \
            res["failed_save"]
        directory, listing = res["after_failed_save"]
        assert directory.endswith("step-000000002") and listing == ["latest.json", "step-000000002"], listing
    assert "File too large" in runs["first"][1]["failed_save"], runs["first"][1]["failed_save"]
    for res in runs["resume"]:
        # The killed save left its partitions in .tmp-save (no state.json, no commit); the load read step 2.
        assert res["listing_before"] == [".tmp-save", "latest.json", "step-000000002"], res["listing_before"]
        assert "state.json" not in res["tmp_before"] and f"zero{WORLD - 1}.safetensors" in res["tmp_before"]
        assert res["listing_after"] == ["latest.json", "step-000000002", "step-000000003"], res["listing_after"]
    with open(os.path.join(runs["root"], "latest.json")) as f:
        assert json.load(f)["current"] == "step-000000003"


def test_refused_loads_change_nothing(runs):
    for rank, res in enumerate(runs["resume"]):
        assert "is a sharded checkpoint (DeepSpeed ZeRO-3, written by 4 ranks" in res["plain_model"], res["plain_model"]
        assert "field optimizer_class is 'torch.optim.adamw.AdamW'" in res["sgd"], res["sgd"]
        assert "pass the optimizer deepspeed.initialize returned" in res["torch_optimizer"], res["torch_optimizer"]
        mine = rank == 1   # rank 1's partition was truncated / edited; the others name it as another rank's
        for name, text in (("truncated", "zero1.safetensors is not a readable safetensors file"),
                           ("edited", "zero1.json: field optimizer/param_groups/0/lr is 'abc'")):
            assert (text in res[name]) if mine else ("another rank failed" in res[name]), (name, res[name])
        assert res["unchanged_after_refusals"], rank


def test_export_is_a_plain_pretrained_model(runs):
    from transformers import AutoModelForCausalLM
    for directory, params in ((runs["export"], runs["first"][0]["params_at_2"]),
                              (runs["export"] + "-twice", runs["first"][0]["params_at_3"])):
        assert sorted(os.listdir(directory)) == ["config.json", "generation_config.json", "model.safetensors"]
        model = AutoModelForCausalLM.from_pretrained(directory)
        for n, p in model.named_parameters():
            assert torch.equal(p, params[n]), f"{directory}: {n}"
    # The second export into the same directory replaced the first atomically: nothing left beside it.
    assert runs["first"][0]["export_listing"] == ["export", "export-twice"]


@pytest.mark.parametrize("variant", ["stage1", "offload", "bf16_stage1", "fp16_stage3"])
def test_other_zero_setups_resume_bit_identically(runs, variant):
    """ZeRO-1; ZeRO-3 offloaded to the host; ZeRO-1 in bf16 (the fp32 masters come from the partitions,
    not from the bf16 weights); ZeRO-3 in fp16 whose dynamic loss scaler overflowed and moved."""
    for rank, (a, b) in enumerate(zip(runs["first"], runs["resume"])):
        a, b = a[variant], b[variant]
        if variant == "stage1":   # whole weights (rank 0) beside every rank's partition of masters and state
            assert "model.safetensors" in a["files"] and f"zero{WORLD - 1}.json" in a["files"], a["files"]
        assert b["loaded"] == {"step": 2, "data_state": {"cursor": 2, "rank": rank}}, b["loaded"]
        assert_resumed_exactly(a, b, f"{variant} rank {rank}")
        # The loss scaler's state and the engine's step counters, restored, then moved alike by step 3.
        assert a["scaler_at_2"] == b["scaler_at_2"] and a["scaler_at_3"] == b["scaler_at_3"], (a, b)
    if variant == "fp16_stage3":
        scaler = runs["first"][0][variant]["scaler_at_2"]
        assert scaler["dynamic"] and scaler["last_overflow_iter"] >= 0 and scaler["cur_scale"] < 2.0 ** 40, scaler
    if variant == "bf16_stage1":
        assert runs["first"][0][variant]["params_at_2"]["lm_head.weight"].dtype == torch.bfloat16


def test_zero_stage_1_refuses_another_stage_and_an_edited_partition(runs):
    for rank, b in enumerate(r["stage1"] for r in runs["resume"]):
        assert ("zero0.json: field zero_stage is 1, this engine runs ZeRO stage 3" in b["stage3_engine"]
                if rank == 0 else "zero_stage is 1" in b["stage3_engine"] or "another rank failed" in
                b["stage3_engine"]), b["stage3_engine"]
        text = "zero1.json: field extra/partition_count is [3]"
        assert (text in b["edited"]) if rank == 1 else ("another rank failed" in b["edited"]), b["edited"]
        assert b["unchanged_after_refusals"], rank
