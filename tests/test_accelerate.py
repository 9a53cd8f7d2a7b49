"""memo.integrations.accelerate: MemoPlugin's settings and errors, and prepare() training under Accelerate.

The training test runs SGD steps through ``accelerate.Accelerator(cpu=True)`` + ``prepare`` on 2
gloo processes (sequence parallel 2, Ulysses) and on 4 (data parallel 2 x sequence parallel 2, ring),
rebuilds each replica's full batches from the shards the ranks were given, and trains a plain
single-process model on the same batches (gradients averaged over the replicas) as the reference:
parameters within twice the plain fp32 model's own error against fp64.
"""

import importlib.util
import os
import types

import numpy as np
import pytest
import torch

from distributed import launch
from memo import MemoConfig, MemoError
from memo.integrations.accelerate import FIELDS, MemoPlugin, check_settings, env_name, prepare, settings_env
from models import build

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def clean_env(monkeypatch):
    for name in FIELDS:
        monkeypatch.delenv(env_name(name), raising=False)
    return monkeypatch


# --- MemoPlugin ----------------------------------------------------------------------------------

def test_unset_fields_come_from_memo_environment_variables(clean_env):
    env = {"MEMO_SWAP_RATIO": "0.25", "MEMO_SEQUENCE_PARALLEL_SIZE": "4", "MEMO_SP_BACKEND": "ulysses",
           "MEMO_KEEP_LAST_LAYERS": "0", "MEMO_HOST_MEMORY_BUDGET": "3GiB", "MEMO_LOSS_CHUNK_SIZE": "512",
           "MEMO_OFFLOAD_DTYPE": "bf16", "MEMO_SP_LAYOUT": "contiguous", "MEMO_ULYSSES_SIZE": "2",
           "MEMO_SP_TIMEOUT_S": "60", "MEMO_ENABLED": "yes"}
    for k, v in env.items():
        clean_env.setenv(k, v)
    p = MemoPlugin()
    assert (p.swap_ratio, p.sequence_parallel_size, p.sp_backend, p.keep_last_layers) == (0.25, 4, "ulysses", 0)
    assert (p.host_memory_budget, p.loss_chunk_size, p.offload_dtype) == ("3GiB", 512, "bf16")
    assert (p.sp_layout, p.ulysses_size, p.sp_timeout_s, p.enabled) == ("contiguous", 2, 60.0, True)
    c = p.to_memo_config()
    assert isinstance(c, MemoConfig)
    assert (c.swap_ratio, c.sequence_parallel_size, c.sp_backend, c.keep_last_layers) == (0.25, 4, "ulysses", 0)
    assert c.host_budget_bytes == 3 * 2**30 and c.loss_chunk_size == 512 and c.offload_dtype == "bf16"
    assert (c.sp_layout, c.ulysses_size, c.sp_timeout_s, c.enabled) == ("contiguous", 2, 60.0, True)


def test_given_fields_win_over_the_environment_and_unset_ones_keep_memoconfig_defaults(clean_env):
    clean_env.setenv("MEMO_SWAP_RATIO", "0.25")
    clean_env.setenv("MEMO_SP_BACKEND", "not-a-backend")   # never read: the field is given
    p = MemoPlugin(swap_ratio="auto", sp_backend="hybrid")
    assert p.swap_ratio == "auto" and p.sp_backend == "hybrid"
    c = p.to_memo_config()
    default = MemoConfig(host_memory_budget="1GiB")
    assert (c.keep_last_layers, c.loss_chunk_size, c.sp_layout, c.sp_timeout_s) == (
        default.keep_last_layers, default.loss_chunk_size, default.sp_layout, default.sp_timeout_s)
    assert c.sequence_parallel_size is None and not c.sequence_parallel


def test_loss_chunk_size_none_keeps_the_models_own_loss(clean_env):
    clean_env.setenv("MEMO_LOSS_CHUNK_SIZE", "None")
    assert MemoPlugin().to_memo_config().loss_chunk_size is None
    assert MemoPlugin(loss_chunk_size="none").to_memo_config().loss_chunk_size is None
    clean_env.setenv("MEMO_ENABLED", "0")
    assert MemoPlugin().to_memo_config().enabled is False


@pytest.mark.parametrize("var,value,words", [
    ("MEMO_SWAP_RATIO", "lots", "neither a number nor 'auto'"),
    ("MEMO_SWAP_RATIO", "1.5", "outside [0, 1]"),
    ("MEMO_SEQUENCE_PARALLEL_SIZE", "two", "is not an integer"),
    ("MEMO_SEQUENCE_PARALLEL_SIZE", "0", "must be an integer >= 1"),
    ("MEMO_KEEP_LAST_LAYERS", "-1", "must be an integer >= 0"),
    ("MEMO_SP_BACKEND", "rings", "is not one of ring, ulysses, hybrid"),
    ("MEMO_SP_LAYOUT", "zig", "is not one of zigzag, contiguous"),
    ("MEMO_OFFLOAD_DTYPE", "fp8", "is not one of keep, bf16, fp16"),
    ("MEMO_HOST_MEMORY_BUDGET", "64 gigs", "is not a size"),
    ("MEMO_LOSS_CHUNK_SIZE", "4k", "none to keep the model's own loss"),
    ("MEMO_SP_TIMEOUT_S", "-3", "positive number of seconds"),
    ("MEMO_ENABLED", "maybe", "is not a boolean"),
    ("MEMO_PLAN", "/nonexistent/plan.json", "memo plan"),
])
def test_a_bad_environment_value_is_refused_naming_the_variable_and_the_value(clean_env, var, value, words):
    clean_env.setenv(var, value)
    with pytest.raises(MemoError) as e:
        MemoPlugin()
    msg = str(e.value)
    assert msg.startswith("memo.integrations.accelerate: ") and f"{var}={value!r}" in msg and words in msg, msg


@pytest.mark.parametrize("kwargs,words", [
    ({"swap_ratio": "0.5"}, "MemoPlugin.swap_ratio='0.5' is neither a number nor 'auto'"),
    ({"swap_ratio": True}, "MemoPlugin.swap_ratio=True must be a fraction"),
    ({"sequence_parallel_size": 2.0}, "MemoPlugin.sequence_parallel_size=2.0 must be an integer >= 1"),
    ({"sequence_parallel_size": "2"}, "MemoPlugin.sequence_parallel_size='2' must be an integer >= 1"),
    ({"sp_backend": "Ring"}, "MemoPlugin.sp_backend='Ring' is not one of ring, ulysses, hybrid"),
    ({"host_memory_budget": -5}, "MemoPlugin.host_memory_budget=-5 is not a size"),
    ({"enabled": "yes"}, "MemoPlugin.enabled='yes' must be true or false"),
    ({"tile_tokens": 0}, "MemoPlugin.tile_tokens=0 must be auto, none or a positive number of tokens"),
    ({"tile_tokens": "big"}, "MemoPlugin.tile_tokens='big' must be auto, none or a positive number of tokens"),
])
def test_a_bad_field_value_is_refused_with_the_value(clean_env, kwargs, words):
    with pytest.raises(MemoError) as e:
        MemoPlugin(**kwargs)
    assert words in str(e.value), str(e.value)


def test_plugin_fields_mirror_memoconfig_and_carry_help_in_accelerate_style():
    from dataclasses import fields
    user_fields = {f.name for f in fields(MemoConfig) if f.init} - {"sequence_parallel_group"}
    assert set(FIELDS) == user_fields
    for f in fields(MemoPlugin):
        assert f.default is None and env_name(f.name) in f.metadata["help"], f.name


def test_settings_of_a_config_section_round_trip_through_the_environment(clean_env):
    section = {"swap_ratio": 0.5, "sequence_parallel_size": 2, "sp_backend": "ring", "host_memory_budget": "2GiB",
               "loss_chunk_size": "none", "enabled": False, "sp_timeout_s": 30, "keep_last_layers": None,
               "tile_tokens": 8192}
    settings = check_settings(section)
    assert "keep_last_layers" not in settings   # null: left to the default
    for k, v in settings_env(settings).items():
        clean_env.setenv(k, v)
    assert MemoPlugin().settings() == {**settings, "sp_timeout_s": 30.0}


@pytest.mark.parametrize("section,words", [
    ({"swap_ration": 0.5}, "unknown key memo.swap_ration"),
    ({"sequence_parallel_size": "2"}, "memo.sequence_parallel_size='2' must be an integer >= 1"),
    ([1, 2], "must be a mapping"),
])
def test_config_sections_refuse_unknown_keys_and_wrong_types(section, words):
    with pytest.raises(MemoError) as e:
        check_settings(section)
    assert words in str(e.value), str(e.value)
    if "unknown" in words:
        assert "swap_ratio" in str(e.value)   # the known keys are listed


def _fake_accelerator(processes, kind="MULTI_CPU"):
    return types.SimpleNamespace(num_processes=processes, distributed_type=f"DistributedType.{kind}",
                                 device_placement=False)


@pytest.mark.parametrize("processes,kind,words", [
    (3, "MULTI_CPU", "sequence_parallel_size=2 does not divide the 3 processes"),
    (2, "DEEPSPEED", "not supported"),
])
def test_prepare_refuses_before_touching_the_model(clean_env, processes, kind, words):
    model = build("llama")
    with pytest.raises(MemoError) as e:
        prepare(_fake_accelerator(processes, kind), model, None, None, MemoPlugin(sequence_parallel_size=2))
    assert words in str(e.value)
    assert not hasattr(model, "_memo_runtime"), "refused after wrapping"


# --- training through Accelerate ---------------------------------------------------------------

_spec = importlib.util.spec_from_file_location("accel_train", os.path.join(HERE, "sp_workers", "accel_train.py"))
STEPS = 2
CASES = {2: {"MEMO_SP_BACKEND": "ulysses"}, 4: {"MEMO_SP_BACKEND": "ring"}}   # world 4: DP 2 x SP 2


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    world = request.param
    env = {"MEMO_SEQUENCE_PARALLEL_SIZE": "2", "MEMO_SWAP_RATIO": "0.5", "MEMO_KEEP_LAST_LAYERS": "1",
           "MEMO_HOST_MEMORY_BUDGET": "1GiB", **CASES[world]}
    return world, launch("accel_train.py", world, steps=STEPS, env=env)


def _worker():
    mod = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(mod)
    return mod


def _full_batches(per_rank, world):
    """{(step, replica): (ids (B, S), shifted labels (B, S))} rebuilt from the SP ranks' shards via positions."""
    out = {}
    for step in range(STEPS):
        for replica in range(world // 2):
            ranks = [2 * replica, 2 * replica + 1]
            shards = [per_rank[r]["seen"][step] for r in ranks]
            b, s = shards[0]["input_ids"].shape[0], shards[0]["input_ids"].shape[1] * 2
            ids = torch.full((b, s), -1, dtype=torch.long)
            labels = torch.full((b, s), -7, dtype=torch.long)
            hits = torch.zeros((b, s), dtype=torch.long)
            for sh in shards:
                assert sh["input_ids"].shape == (b, s // 2), "each rank holds half the sequence"
                ids.scatter_(1, sh["position_ids"], sh["input_ids"])
                labels.scatter_(1, sh["position_ids"], sh["labels"])
                hits.scatter_add_(1, sh["position_ids"], torch.ones_like(sh["position_ids"]))
            assert bool((hits == 1).all()), f"step {step} replica {replica}: positions not covered exactly once"
            out[step, replica] = ids, labels
    return out


def test_ranks_of_a_replica_share_one_full_batch_and_replicas_get_different_ones(trained):
    world, per_rank = trained
    data = _worker().dataset()
    rows = {tuple(d["input_ids"].tolist()): i for i, d in enumerate(data)}
    used = []
    for (step, replica), (ids, labels) in _full_batches(per_rank, world).items():
        for row, lab in zip(ids, labels):
            i = rows.get(tuple(row.tolist()))
            assert i is not None, f"step {step} replica {replica}: the shards do not form a dataset sample"
            want = torch.nn.functional.pad(data[i]["labels"][1:], (0, 1), value=-100)
            assert torch.equal(lab, want), "labels are shifted over the whole sequence, then sharded"
            used.append(i)
    assert len(used) == len(set(used)) == STEPS * (world // 2) * 2, "replicas and steps must get distinct samples"
    for r, res in enumerate(per_rank):
        assert res["sp_ranks"] == [r // 2 * 2, r // 2 * 2 + 1] and res["sharded_loader"]
        assert res["skip_resumes_at_the_second_batch"]
        assert res["ddp"] == "DistributedDataParallel" and res["distributed_type"] == "DistributedType.MULTI_CPU"
        assert res["swapped_bytes"] > 0, "memo must swap under Accelerate"
        assert res["sp_backend"] == CASES[world]["MEMO_SP_BACKEND"]


def _reference(batches, world, dtype):
    """Plain single-process training on the replicas' full batches; returns (losses {(step, replica)}, params)."""
    worker = _worker()
    model = build("llama", seed=3).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=worker.LR)
    replicas = world // 2
    losses = {}
    for step in range(STEPS):
        opt.zero_grad()
        for replica in range(replicas):
            ids, shifted = batches[step, replica]
            loss = model(input_ids=ids, shift_labels=shifted, labels=shifted).loss
            (loss / replicas).backward()   # DDP: the mean over the data-parallel replicas
            losses[step, replica] = loss.item()
        opt.step()
    return losses, {n: p.detach().double() for n, p in model.named_parameters()}


def test_parameters_and_losses_match_a_single_process_model_on_the_same_batches(trained):
    world, per_rank = trained
    batches = _full_batches(per_rank, world)
    torch.set_num_threads(2)
    loss64, ref = _reference(batches, world, torch.float64)
    loss32, plain = _reference(batches, world, torch.float32)
    start = {n: p.detach().double() for n, p in build("llama", seed=3).named_parameters()}
    failures, moved = [], 0.0
    for r, res in enumerate(per_rank):
        for step, seen in enumerate(res["seen"]):
            key = (step, r // 2)
            err, base = abs(seen["loss"] - loss64[key]), abs(loss32[key] - loss64[key])
            if not err <= 2 * max(base, float(np.spacing(np.float32(loss64[key])))):
                failures.append(f"rank {r} step {step} loss: error {err:.3g} > 2 x plain fp32 {base:.3g}")
        for n, want in ref.items():
            got = res["params"][n].double()
            err, base = (got - want).abs().max().item(), (plain[n] - want).abs().max().item()
            # Parameters are stored in fp32: one spacing of the largest is the floor of any fp32 run's error.
            floor = float(np.spacing(np.float32(want.abs().max().item())))
            if not err <= 2 * max(base, floor):
                failures.append(f"rank {r} {n}: error {err:.3g} > 2 x max(plain fp32 {base:.3g}, "
                                f"fp32 spacing {floor:.3g})")
            moved = max(moved, (want - start[n]).abs().max().item())
    assert not failures, f"world {world}:\n" + "\n".join(failures[:20])
    assert moved > 1e-3, "the steps must change the parameters for the comparison to mean anything"
