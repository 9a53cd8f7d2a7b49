"""memo under DeepSpeed ZeRO (integrations/deepspeed.py), on DeepSpeed's CPU accelerator over 2 gloo ranks.

One launch of tests/sp_workers/ds_cases.py trains a tiny Llama 3 steps per case:

- ZeRO stages 0-3 under deepspeed.initialize (stage 3 with weights born partitioned under
  deepspeed.zero.Init): a memo-wrapped twin that swaps half its tokens and recomputes the rest has the
  plain model's losses, and every recomputation saw its layer's weights whole;
- stages 1-3 through Accelerate's DeepSpeed plugin (Accelerate creates the engine from the config);
- memo's sequence parallelism over both ranks inside one engine (stages 0-2) against torch on the
  whole sequence; stage 3 refused.

Then the DeepSpeed config a ``memo plan`` file maps to, and the refusals. The DeepSpeed tests skip
when DeepSpeed is not installed (it is an optional extra; ``make setup`` installs it).
"""

import importlib.util
import json

import numpy as np
import pytest
import torch

import memo
from distributed import launch
from memo.integrations.deepspeed import memo_zero_config

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="DeepSpeed is not installed: pip install --no-build-isolation 'memo[deepspeed]' "
                              "(`make setup` installs it)")

STEPS, SWAPPED_LAYERS, PARAMS_PER_LAYER = 3, 3, 9   # 4 layers, keep_last_layers=1; q k v o gate up down + 2 norms


@pytest.fixture(scope="module")
def runs():
    if not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed")
    return launch("ds_cases.py", 2, timeout=300)


def _spacing(x: float) -> float:
    return float(np.spacing(np.float32(x)))


def _check_same_losses(plain: torch.Tensor, got: torch.Tensor) -> None:
    """memo does not change the forward: the first loss (no update yet) is bit-identical. Later losses
    follow updates from gradients through recomputed activations, which may round differently from the
    full-sequence forward (DESIGN.md section 4: within twice the plain fp32 error, not bit-exact in
    general); allow 4 fp32 spacings of the loss per update. Measured here: bit-identical at every step
    of every stage, on both ranks."""
    assert torch.equal(plain[0], got[0]), (plain, got)
    for step in range(1, STEPS):
        tol = 4 * step * _spacing(plain[step].item())
        assert abs(plain[step].item() - got[step].item()) <= tol, (step, plain, got)


def _check_recomputes(memo_run: dict, partitioned: bool) -> None:
    assert memo_run["recomputed_bytes"] > 0, "swap_ratio 0.5 must recompute"
    rec = memo_run["recomputes"]
    assert len(rec) == STEPS * SWAPPED_LAYERS, rec
    # See NOTE [ ZeRO-3 and recomputation ] rule 3: the weights of a recomputed layer are gathered.
    assert all(r["whole"] for r in rec), rec
    assert all(r["zero_params"] == (PARAMS_PER_LAYER if partitioned else 0) for r in rec), rec


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_trains_like_the_plain_model(runs, stage):
    for rank, res in enumerate(runs):
        case = res["zero"][stage]
        _check_same_losses(case["plain"]["losses"], case["memo"]["losses"])
        _check_recomputes(case["memo"], partitioned=stage == 3)
        # the config made from the wrapped model is the one made from the plan's model_type
        assert case["memo"]["config_from_model"] == case["config"]
    # data parallel: the ranks saw different batches
    assert not torch.equal(runs[0]["zero"][stage]["plain"]["losses"], runs[1]["zero"][stage]["plain"]["losses"])


@needs_deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_accelerate_deepspeed_plugin(runs, stage):
    for res in runs:
        case = res["accelerate"][stage]
        assert case["memo"]["distributed_type"].endswith("DEEPSPEED") and case["memo"]["engine"] == "DeepSpeedEngine"
        _check_same_losses(case["plain"]["losses"], case["memo"]["losses"])
        _check_recomputes(case["memo"], partitioned=stage == 3)
        # the same steps as deepspeed.initialize (stage 3 there starts from zero.Init's weights)
        if stage < 3:
            assert torch.equal(case["memo"]["losses"], res["zero"][stage]["memo"]["losses"])


@needs_deepspeed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sequence_parallel_under_deepspeed(runs, stage):
    """Both ranks share each sequence; DeepSpeed must SUM their gradient shares (NOTE [ DeepSpeed and
    sequence parallelism ]). Against torch on the whole sequence, within twice the plain fp32 model's own
    error against fp64 (at least one fp32 spacing of the loss: ring attention and the chunked loss sum
    in another order) per step taken, and the same gradient norm."""
    ref32, ref64 = runs[0]["sp_reference"]["fp32"], runs[0]["sp_reference"]["fp64"]
    for res in runs:
        case = res["sp"][stage]
        _check_recomputes(case, partitioned=stage == 3)
        # The gradient norm is the whole sequence's: Adam hides a gradient scaled by 1/2 (a mean instead of
        # the sum over the ranks) from the losses almost entirely, the norm does not.
        np.testing.assert_allclose(case["norms"], ref64["norms"], rtol=1e-4)
        for step in range(STEPS):
            got, r64, r32 = case["losses"][step].item(), ref64["losses"][step].item(), ref32["losses"][step].item()
            plain_err = max(abs(r32 - r64), _spacing(r64))
            assert abs(got - r64) <= 2 * plain_err * (step + 1), (stage, step, got, r64, r32)
    assert torch.equal(runs[0]["sp"][stage]["losses"], runs[1]["sp"][stage]["losses"]), "one loss per sequence"


@needs_deepspeed
def test_refusals_inside_a_run(runs):
    for res in runs:
        assert "zero_optimization.reduce_scatter=True under ZeRO stage 3 with memo's sequence parallelism" in \
            res["sp_zero3"], res["sp_zero3"]
        assert "remove the key (memo sets reduce_scatter: false)" in res["sp_zero3"]
        assert "already has DeepSpeed ZeRO-3 hooks" in res["late_prepare"]
        assert "before deepspeed.initialize" in res["late_prepare"]


@pytest.fixture(scope="module")
def offload_run():
    if not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed")
    return launch("ds_offload_cases.py", 1, timeout=300)[0]


@needs_deepspeed
def test_zero3_parameter_offload_trains_like_the_plain_model(offload_run):
    """ZeRO-3 with the weights and the optimizer on the host (``memo plan --offload-params``; NOTE [ Parameter
    offload ] in planner/cost.py), one process on DeepSpeed's CPU accelerator: the memo twin, whose
    recomputations gather their layer's weights from the host, trains like the plain model under the same
    config (the bound of the other ZeRO cases, losses and weights), and the plain model like torch."""
    res = offload_run
    zero = res["config"]["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}     # no CUDA here: nothing to pin
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    plain, got = res["plain"], res["memo"]
    for run in (plain, got):   # DeepSpeed took the config: weights and optimizer offloaded, shards on the host
        assert (run["offload_param"], run["offload_optimizer"], run["shard_devices"]) == ("cpu", "cpu", ["cpu"])
    _check_same_losses(plain["losses"], got["losses"])
    _check_recomputes(got, partitioned=True)
    for name, ref in plain["params"].items():
        tol = 4 * STEPS * _spacing(ref.abs().max().item())
        assert (got["params"][name] - ref).abs().max().item() <= tol, name
        assert not torch.equal(ref, plain["initial"][name]), f"{name} was not trained"
    # DeepSpeed's AdamW steps flat fp32 partitions and rounds unlike torch's per-tensor one: the same first
    # loss (the offloaded weights reach the forward exactly), then within 8 spacings per update (measured 8
    # after two).
    ref = res["torch"]["losses"]
    assert torch.equal(ref[0], plain["losses"][0])
    for step in range(1, STEPS):
        assert abs(ref[step].item() - plain["losses"][step].item()) <= 8 * step * _spacing(ref[step].item())


# --- the config a plan maps to -------------------------------------------------------------------

def test_plan_file_maps_to_the_deepspeed_config(tmp_path, capsys):
    from memo.cli.main import main
    path = tmp_path / "plan.json"
    code = main(["plan", "--model", "llama2-7b", "--seq-len", "16K", "--micro-batch", "1", "--gpus", "2", "--sp", "2",
                 "--gpu", "a800", "--host-memory", "256GiB", "--zero-stage", "3", "--offload-optimizer",
                 "--time-limit", "1", "--json", "--out", str(path)])
    assert code == 0, capsys.readouterr().err
    plan = json.loads(path.read_text())
    assert (plan["zero_stage"], plan["offload_optimizer"], plan["dtype"]) == (3, True, "bf16")
    assert memo_zero_config(str(path)) == {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                              "leaf_module": {"classes": ["LlamaDecoderLayer"]}},
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
    }
    # explicit arguments win over the plan
    cfg = memo_zero_config(path, dtype="fp32", micro_batch=4, gradient_accumulation_steps=8, offload_optimizer=False)
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (4, 8)
    assert "offload_optimizer" not in cfg["zero_optimization"]


@pytest.mark.parametrize("stage,dtype,offload", [(0, "fp32", False), (1, "bf16", True), (2, "fp16", False),
                                                 (2, "float32", True)])
def test_stage_dtype_and_offload(stage, dtype, offload):
    cfg = memo_zero_config({"zero_stage": stage, "dtype": dtype, "offload_optimizer": offload, "micro_batch": 2,
                            "model": {"model_type": "llama"}})
    zero = cfg["zero_optimization"]
    assert zero["stage"] == stage and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["bf16"]["enabled"] == (dtype == "bf16") and cfg["fp16"]["enabled"] == (dtype == "fp16")
    assert ("offload_optimizer" in zero) == offload
    assert "leaf_module" not in zero, "only stage 3 partitions the weights a layer reads"
    assert memo_zero_config(stage) == memo_zero_config({"zero_stage": stage})


def test_parameter_offload_from_the_plan(monkeypatch):
    """``offload_params`` in a plan (``memo plan --offload-params``) becomes DeepSpeed's ``offload_param``,
    pinned only where CUDA is there to use pinned memory; plans without the field keep the weights on the GPU."""
    plan = {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "model": {"model_type": "llama"}}
    zero = memo_zero_config(plan)["zero_optimization"]
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert memo_zero_config(plan)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memo_zero_config(plan)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert "offload_param" not in memo_zero_config(plan, offload_params=False)["zero_optimization"]
    older = {k: v for k, v in plan.items() if k != "offload_params"}
    assert "offload_param" not in memo_zero_config(older)["zero_optimization"]
    assert "offload_param" in memo_zero_config(older, offload_params=True)["zero_optimization"]


def test_stage3_leaf_module_from_the_model_and_its_type():
    from models import build
    model = memo.wrap(build("mistral"), memo.MemoConfig(swap_ratio=0.5, host_memory_budget="1GiB"))
    assert memo_zero_config(3, model=model)["zero_optimization"]["leaf_module"] == {"classes": ["MistralDecoderLayer"]}
    off = memo.wrap(build("llama"), memo.MemoConfig(enabled=False))   # memo off: the model's own decoder layers
    assert memo_zero_config(3, model=off)["zero_optimization"]["leaf_module"] == {"classes": ["LlamaDecoderLayer"]}
    plan = {"zero_stage": 3, "model": {"model_type": "qwen2"}}
    assert memo_zero_config(plan)["zero_optimization"]["leaf_module"] == {"classes": ["Qwen2DecoderLayer"]}
    with pytest.warns(UserWarning, match=r"call memo.integrations.deepspeed.prepare\(model\)"):
        cfg = memo_zero_config(3)
    assert "leaf_module" not in cfg["zero_optimization"]


@pytest.mark.parametrize("arg,kwargs,match", [
    (4, {}, "ZeRO stage 4 does not exist; use 0, 1, 2 or 3"),
    (True, {}, "zero stage=True must be an int"),
    (-1, {}, "zero stage=-1 must be an int >= 0"),
    (0, {"offload_optimizer": True}, "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    (3, {"offload_params": True}, "offload_params needs ZeRO stage 3 and offload_optimizer"),
    (2, {"offload_params": True, "offload_optimizer": True}, "got stage 2: use stage 3 with offload_optimizer=True"),
    (3, {"offload_params": 1, "offload_optimizer": True}, "offload_params=1 must be True or False"),
    (1, {"dtype": "int8"}, "dtype='int8' is not one of bf16, fp16, fp32"),
    (1, {"micro_batch": 0}, "micro_batch=0 must be an int >= 1"),
    ({"alpha": 0.5}, {}, "the plan has no 'zero_stage'; make it again with `memo plan"),
])
def test_config_refusals(arg, kwargs, match):
    with pytest.raises(memo.MemoError, match=match.replace("(", r"\(").replace(")", r"\)")):
        memo_zero_config(arg, **kwargs)


def test_corrupt_plan_file_refused(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text('{"zero_stage": 3,')
    with pytest.raises(memo.MemoError, match="not valid JSON .* make it again with `memo plan"):
        memo_zero_config(str(bad))


@needs_deepspeed
def test_prepare_and_initialize_refusals(tmp_path):
    from memo.integrations import deepspeed as memo_ds
    from models import build
    plain = build("llama")   # memo not on it (as with MemoConfig(enabled=False)): nothing to do
    assert memo_ds.prepare(plain) is plain and not any(getattr(m, "_z3_leaf", False) for m in plain.modules())
    model = memo.wrap(build("llama"), memo.MemoConfig(swap_ratio=0.5, host_memory_budget="1GiB"))
    assert memo_ds.prepare(model) is model and memo_ds.prepare(model) is model   # idempotent
    assert all(layer._z3_leaf for layer in model.model.layers)
    assert not any(getattr(m, "_z3_leaf", False) for m in model.model.layers[0].modules() if m is not
                   model.model.layers[0])
    with pytest.raises(memo.MemoError, match="sets 'sequence_parallel_size'; memo gives DeepSpeed its"):
        memo_ds.initialize(model, {"sequence_parallel_size": 2, "data_parallel_size": 1})
    bad = tmp_path / "ds.json"
    bad.write_text("{")
    with pytest.raises(memo.MemoError, match="is not valid JSON"):
        memo_ds.initialize(model, str(bad))


def test_zero3_sequence_parallel_config_takes_the_summing_reduction():
    """NOTE [ DeepSpeed and sequence parallelism ] rule 4: reduce_scatter off, contiguous gradients on,
    every bucket within reduce_bucket_size (raised to the largest parameter); the other way refused."""
    from memo.integrations.deepspeed import zero3_sequence_parallel_config
    from models import build
    model = build("llama", vocab_size=512)   # embedding 512 x 64 = 32,768 elements
    config = {"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}, "train_micro_batch_size_per_gpu": 1}
    got = zero3_sequence_parallel_config(config, model)["zero_optimization"]
    assert got == {"stage": 3, "reduce_bucket_size": 32768, "reduce_scatter": False, "contiguous_gradients": True}
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 1000}, "the caller's config is not changed"
    assert zero3_sequence_parallel_config({"zero_optimization": {"stage": 3}}, model)["zero_optimization"][
        "reduce_bucket_size"] == 500_000_000
    with pytest.raises(memo.MemoError, match="contiguous_gradients=False under ZeRO stage 3"):
        zero3_sequence_parallel_config({"zero_optimization": {"stage": 3, "contiguous_gradients": False}}, model)
