"""memo under DeepSpeed ZeRO: ``prepare`` / ``initialize`` (the model) and ``memo_zero_config`` (the config).

    model = memo.wrap(build_model(), memo.MemoConfig(swap_ratio=0.5))
    config = memo_zero_config("plan.json", model=model)          # or memo_zero_config(3, model=model)
    engine, optimizer, _, _ = memo.integrations.deepspeed.initialize(model, config, optimizer=optimizer)
    loss = engine(**batch).loss; engine.backward(loss); engine.step()

Under Accelerate's DeepSpeed plugin, pass ``memo_zero_config(...)`` as the plugin's ``hf_ds_config``
(or call ``prepare(model)`` after ``memo.wrap`` and before ``accelerator.prepare``). Stages 0, 1 and 2
need nothing from memo: they shard optimizer states and gradients, never the weights a layer's
forward reads. Stage 3 does (NOTE [ ZeRO-3 and recomputation ]).

# NOTE [ ZeRO-3 and recomputation ]
#
# 1. ZeRO-3 keeps every weight partitioned over the data-parallel ranks (``param.data`` is an
#    empty tensor, the full shape is ``param.ds_shape``) and gathers it in a pre-forward hook of the
#    module that owns it directly, releasing it in the post-forward hook; in backward a pre-backward
#    hook on the module's outputs gathers it again.
# 2. memo needs a swapped layer's full weights at three moments the per-submodule hooks do not
#    cover. (a) The first call traces the layer under FakeTensorMode (memo/trace.py): the fakes are
#    made from the weights as they are then, partitioned, and the submodules' hooks would all-gather
#    under FakeTensorMode (observed: "Attempting to broadcast a dimension of length 64 ... expected
#    shape should be broadcastable to [1, 1, 0]" from the RMSNorm). (b) ``LayerState`` classifies
#    saved weights by their storage (NOTE [ Saved tensor classes ] rule 1) before the forward runs.
#    (c) Recomputation re-runs the layer inside backward, when the gradient reaches the layer's
#    first saved tensor (memo/executor.py ``_recompute``).
# 3. ``prepare`` marks every wrapped decoder layer a ZeRO-3 *leaf module* (DeepSpeed's
#    ``set_z3_leaf_module``, the mechanism it uses for MoE blocks). DeepSpeed then installs no hooks
#    below the layer; it gathers all the layer's weights in the layer's own pre-forward hook, which
#    runs before memo's layer forward (so (a) and (b) see full weights and nothing gathers under
#    FakeTensorMode), and in the layer's pre-backward hook, which fires when the gradient reaches the
#    layer's output, before any node inside the layer unpacks a saved tensor, so before (c).
# 4. The gathered weights of one layer are live at a time (two with DeepSpeed's prefetch of the
#    next), which is the "ZeRO-3 gather buffer" ``memo plan`` counts (planner/cost.py).
# 5. ``memo_zero_config(..., model=...)`` also names the layer classes in
#    ``zero_optimization.leaf_module``, so an engine made by someone else (Accelerate) applies rule 3
#    when it is created, without a call to ``prepare``.
# 6. DeepSpeed gathers a leaf module's weights for its backward only when its input requires grad
#    (observed with DeepSpeed 0.19 alone, no memo: a frozen embedding, layers marked leaves, "The size
#    of tensor a (0) must match the size of tensor b (128)" in the first layer's backward). ``prepare``
#    therefore adds a forward hook on the input embeddings that makes their output require grad when
#    the first layer has ZeRO-3 weights to train, as ``enable_input_require_grads`` does in
#    transformers. The embedding weight stays frozen; the cost is the gradient of the first layer's
#    input, one hidden-state tensor, computed and dropped.

# NOTE [ DeepSpeed and sequence parallelism ]
#
# 1. Under memo's sequence parallelism of P ranks (consecutive blocks, memo.wrap) each rank's
#    backward gives its own tokens' share of the gradient; the step's gradient is the SUM over the
#    block, averaged over the W/P data-parallel replicas (NOTE [ Gradients under data x sequence
#    parallelism ] in integrations/accelerate.py).
# 2. DeepSpeed does exactly this when ``deepspeed.initialize`` gets an ``mpu`` in the form of its
#    own Ulysses unit (``deepspeed.runtime.sequence_parallel.parallel_state_sp``, recognised by its
#    ``initialize_sequence_parallel``): ZeRO shards and reduces over the sequence-data-parallel group
#    (all W ranks) and divides by W/P. ``initialize`` hands it ``SequenceParallelUnit``, that unit
#    over memo's own groups.
# 3. The config route (``sequence_parallel_size`` + ``data_parallel_size`` in the DeepSpeed config,
#    a device mesh) is wrong for memo in DeepSpeed 0.19.8: ZeRO 0-2 then reduce over the mesh's
#    data-parallel dimension only, so with W = P nothing is summed over the sequence (measured on 2
#    CPU ranks, stage 1: gradient norm 2.21 where the whole sequence's is 1.43, the third loss 1e-2
#    off the single-process run; with the unit the same norm and 1e-6). So ``memo_zero_config`` never
#    writes those keys, ``initialize`` refuses them, and sequence parallelism under DeepSpeed goes
#    through ``initialize`` only (Accelerate's DeepSpeed plugin cannot pass an ``mpu``).
# 4. ZeRO-3 with the unit has two reductions. Its reduce-scatter path (``reduce_scatter: true``, the
#    default, and any bucket larger than ``reduce_bucket_size``) divides by the W ranks and never
#    multiplies by P: its gradient norm is exactly half the whole sequence's at P = 2 (0.716 vs
#    1.432). Its all-reduce path (``reduce_scatter: false`` with ``contiguous_gradients: true``, every
#    bucket within ``reduce_bucket_size``) divides by W/P, as stages 0-2 do: the norm 1.43199786 vs
#    1.43199778 in fp64, the losses within fp32 rounding (measured on 2 CPU ranks). So ``initialize``
#    sets those two keys under stage 3 with sequence parallelism, raises ``reduce_bucket_size`` to
#    the largest parameter (so no bucket takes the other path; its buffer is that many gradient
#    elements), and refuses a config that sets either key the other way. The all-reduce moves twice
#    the bytes of a reduce-scatter. Accelerate's DeepSpeed plugin cannot pass the unit (rule 3), so
#    ``memo launch`` with distributed_type DEEPSPEED refuses sequence parallelism: call
#    ``initialize`` in the script (or use FSDP2, integrations/fsdp.py).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Union

import torch

from memo.errors import MemoError

_WHO = "memo.integrations.deepspeed"

_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
           "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
           "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}


def _deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise MemoError(f"{_WHO}: DeepSpeed is not installed; pip install --no-build-isolation 'memo[deepspeed]' "
                        f"(or deepspeed)") from e
    return deepspeed


def _runtime(model):
    """memo's runtime of ``model``, or None when memo is not on it (not wrapped, or MemoConfig(enabled=False))."""
    if type(model).__name__ == "DeepSpeedEngine":
        raise MemoError(f"{_WHO}: got a DeepSpeedEngine; call this on the memo-wrapped model before "
                        f"deepspeed.initialize")
    from memo.integrations.fsdp import is_sharded
    if is_sharded(model):   # NOTE [ FSDP2 and sequence parallelism ] rule 5 in integrations/fsdp.py
        raise MemoError(f"{_WHO}: the model is sharded by FSDP (memo.integrations.fsdp.fully_shard or torch's "
                        f"fully_shard); FSDP and DeepSpeed both shard the weights and cannot be mixed. Use one: "
                        f"DeepSpeed on a model FSDP never wrapped, or FSDP2 without DeepSpeed")
    from memo.wrap import runtime_of
    try:
        return runtime_of(model)
    except MemoError:
        return None


def layer_class_names(model) -> list[str]:
    """Class names of the decoder layers memo wraps in ``model`` (the ZeRO-3 leaf modules); for a model
    memo is not on, its ``_no_split_modules`` (transformers' name for its decoder layers)."""
    runtime = _runtime(model)
    if runtime is None:
        return sorted(getattr(model, "_no_split_modules", None) or [])
    return sorted({type(layer).__name__ for layer in runtime.layers})


def prepare(model):
    """Make the memo-wrapped ``model`` safe for ZeRO-3; call it before ``deepspeed.initialize``.

    Marks every wrapped decoder layer a ZeRO-3 leaf module (NOTE [ ZeRO-3 and recomputation ]
    rule 3). Harmless under stages 0-2 (they never partition weights) and idempotent; nothing to do
    for a model memo is not on (so ``MemoConfig(enabled=False)`` leaves call sites unchanged). Returns
    ``model``.
    """
    runtime = _runtime(model)
    if runtime is None:
        return model
    _deepspeed()
    from deepspeed.utils import set_z3_leaf_module, z3_leaf_module
    for i, layer in enumerate(runtime.layers):
        if z3_leaf_module(layer):
            continue
        # DeepSpeed's ZeRO-3 engine numbers every module it hooks (``ds_id``); a hooked submodule of a
        # layer that is not a leaf means the engine exists already and its hooks cannot be redone.
        if any(hasattr(m, "ds_id") for m in layer.modules() if m is not layer):
            raise MemoError(f"{_WHO}: decoder layer {i} already has DeepSpeed ZeRO-3 hooks on its submodules; call "
                            f"memo.integrations.deepspeed.prepare(model) after memo.wrap and before "
                            f"deepspeed.initialize / accelerator.prepare (or use memo.integrations.deepspeed."
                            f"initialize, or pass memo_zero_config(..., model=model) as the DeepSpeed config)")
        set_z3_leaf_module(layer, True)
    _first_layer_input_requires_grad(model, runtime)
    return model


def _first_layer_input_requires_grad(model, runtime) -> None:
    """NOTE [ ZeRO-3 and recomputation ] rule 6: the input embeddings' output requires grad under ZeRO-3."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or getattr(embeddings, "_memo_requires_grad_hook", False):
        return
    first = runtime.layers[0]

    def hook(module, args, output):
        if (isinstance(output, torch.Tensor) and torch.is_grad_enabled() and not output.requires_grad
                and any(hasattr(p, "ds_id") and p.requires_grad for p in first.parameters())):
            output.requires_grad_(True)
        return output
    embeddings.register_forward_hook(hook)
    embeddings._memo_requires_grad_hook = True


def initialize(model, config: Union[dict, str], **kwargs):
    """``deepspeed.initialize(model=model, config=config, **kwargs)`` for a memo-wrapped model.

    ``config``: a dict (``memo_zero_config``) or a path to a DeepSpeed JSON config. Calls
    ``prepare(model)`` first; under memo's sequence parallelism passes DeepSpeed the
    ``SequenceParallelUnit`` of the model's groups as ``mpu`` (NOTE [ DeepSpeed and sequence
    parallelism ]). Returns DeepSpeed's ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    runtime = _runtime(model)
    deepspeed = _deepspeed()
    if isinstance(config, (str, os.PathLike)):
        config = _read_json(config)
    if not isinstance(config, dict):
        raise MemoError(f"{_WHO}.initialize: config must be a dict or a path to a JSON file, got "
                        f"{type(config).__name__}")
    for key in ("sequence_parallel_size", "data_parallel_size"):
        if key in config:
            raise MemoError(f"{_WHO}.initialize: the DeepSpeed config sets {key!r}; memo gives DeepSpeed its "
                            f"sequence-parallel groups itself (NOTE [ DeepSpeed and sequence parallelism ] rule 3). "
                            f"Remove the key (memo_zero_config never writes it)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if runtime is not None and runtime.sp is not None and stage == 3:
        config = zero3_sequence_parallel_config(config, model)
    prepare(model)
    if runtime is not None and runtime.sp is not None:
        if kwargs.get("mpu") is not None:
            raise MemoError(f"{_WHO}.initialize: the model runs memo's sequence parallelism, which supplies "
                            f"DeepSpeed's mpu itself; drop mpu=")
        kwargs["mpu"] = SequenceParallelUnit(runtime.sp)
    return deepspeed.initialize(model=model, config=config, **kwargs)


def zero3_sequence_parallel_config(config: dict, model) -> dict:
    """``config`` with the ZeRO-3 gradient reduction that sums memo's per-rank shares: NOTE [ DeepSpeed and
    sequence parallelism ] rule 4. A copy; a config that asks for the other reduction is refused."""
    zero = dict(config.get("zero_optimization", {}))
    for key, want in (("reduce_scatter", False), ("contiguous_gradients", True)):
        if key in zero and zero[key] is not want:
            raise MemoError(f"{_WHO}.initialize: zero_optimization.{key}={zero[key]!r} under ZeRO stage 3 with "
                            f"memo's sequence parallelism: that gradient reduction averages over the "
                            f"sequence-parallel ranks instead of summing them (NOTE [ DeepSpeed and sequence "
                            f"parallelism ] rule 4); remove the key (memo sets {key}: {str(want).lower()})")
        zero[key] = want
    largest = max((int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()), default=0)
    bucket = int(float(zero.get("reduce_bucket_size", 5e8)))   # DeepSpeed's default: 5e8 elements
    zero["reduce_bucket_size"] = max(bucket, largest)
    return dict(config, zero_optimization=zero)


class SequenceParallelUnit:
    """DeepSpeed's Ulysses ``mpu`` interface over memo's sequence-parallel groups.

    See NOTE [ DeepSpeed and sequence parallelism ] rule 2. The sequence-data-parallel group is the
    whole world (memo's blocks of P consecutive ranks tile it); made here, collectively, on every rank.
    There is no model (tensor) parallelism: its group is this rank alone (DeepSpeed's gradient clipping
    sums norms over it).
    """

    def __init__(self, sp) -> None:
        import torch.distributed as dist
        self.sp = sp
        world, rank = dist.get_world_size(), dist.get_rank()
        self.world = dist.new_group(list(range(world)))
        self.alone = None
        for r in range(world):   # every rank takes part in creating every group
            group = dist.new_group([r])
            if r == rank:
                self.alone = group

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        # DeepSpeed only tests for this attribute (it marks a Ulysses unit); memo made the groups.
        raise MemoError(f"{_WHO}: memo's sequence-parallel groups exist already (size {self.sp.size})")

    def get_sequence_parallel_group(self):
        return self.sp.group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp.size

    def get_sequence_parallel_rank(self) -> int:
        return self.sp.rank

    def get_sequence_data_parallel_group(self):
        return self.world

    def get_sequence_data_parallel_world_size(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size(self.world)

    def get_sequence_data_parallel_rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank(self.world)

    def get_model_parallel_group(self):
        return self.alone

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def _read_json(path) -> dict:
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise MemoError(f"{_WHO}: cannot read DeepSpeed config {str(path)!r} ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise MemoError(f"{_WHO}: DeepSpeed config {str(path)!r} is not valid JSON ({e.msg} at line "
                        f"{e.lineno}); fix the file or make one with memo_zero_config") from e


def _plan(plan_or_stage) -> Optional[dict]:
    if isinstance(plan_or_stage, dict):
        return plan_or_stage
    if isinstance(plan_or_stage, (str, os.PathLike)):
        from memo.planner.planfile import PlanFileError, load_plan
        try:
            return load_plan(os.fspath(plan_or_stage))
        except PlanFileError as e:
            raise MemoError(str(e)) from e
    return None


def _int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MemoError(f"{_WHO}.memo_zero_config: {name}={value!r} must be an int >= {low}")
    return value


def decoder_layer_classes(model_type: str) -> list[str]:
    """Decoder layer class names of a transformers ``model_type`` (its ``_no_split_modules``), or []."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    except (ImportError, KeyError, AttributeError):
        return []
    return sorted(getattr(cls, "_no_split_modules", None) or [])


def memo_zero_config(plan_or_stage: Union[int, dict, str, os.PathLike], *, micro_batch: Optional[int] = None,
                     gradient_accumulation_steps: int = 1, dtype: Optional[str] = None,
                     offload_optimizer: Optional[bool] = None, offload_params: Optional[bool] = None,
                     model: Any = None) -> dict:
    """The DeepSpeed config for a ZeRO stage, or for the one a ``memo plan`` chose.

    ``plan_or_stage``: a ZeRO stage (0-3), a plan dict, or the path of a plan file (``memo plan --out``;
    JSON, read with the schema checks of ``memo.planner.planfile``). From a plan come ``zero_stage``,
    ``offload_optimizer``, ``offload_params``, ``dtype`` and ``micro_batch``; keyword arguments given
    explicitly override them. Returns a dict for ``deepspeed.initialize(config=...)`` or Accelerate:

    - ``zero_optimization.stage``; ``offload_optimizer: {device: cpu, pin_memory: true}`` when the
      plan offloads the optimizer (DeepSpeed's CPU Adam; stages 1-3 only);
    - ``offload_param: {device: cpu, pin_memory: <CUDA available>}`` when the plan offloads the
      parameters (``memo plan --offload-params``: stage 3 with the optimizer offloaded; NOTE [ Parameter
      offload ] in planner/cost.py); pinned only where CUDA can use it;
    - ``bf16`` / ``fp16`` enabled for those dtypes, neither for fp32;
    - ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` (DeepSpeed derives the
      global batch from the data-parallel world);
    - nothing about sequence parallelism: a plan with ``sp`` > 1 trains through ``initialize``, which
      gives DeepSpeed memo's groups (NOTE [ DeepSpeed and sequence parallelism ] rule 3);
    - stage 3: ``zero_optimization.leaf_module.classes``, the decoder layers (from ``model`` when given,
      else from the plan's ``model_type``) (NOTE [ ZeRO-3 and recomputation ] rule 5);
    - ``zero_allow_untested_optimizer: true``: memo does not choose the optimizer, and a torch
      optimizer passed to ``deepspeed.initialize`` is the usual case.
    """
    plan = _plan(plan_or_stage)
    if plan is None:
        stage = _int(plan_or_stage, "zero stage", 0)
        plan = {}
    else:
        if "zero_stage" not in plan:
            raise MemoError(f"{_WHO}.memo_zero_config: the plan has no 'zero_stage'; make it again with `memo plan "
                            f"... --out plan.json`")
        stage = _int(plan["zero_stage"], "the plan's zero_stage", 0)
    if stage > 3:
        raise MemoError(f"{_WHO}.memo_zero_config: ZeRO stage {stage} does not exist; use 0, 1, 2 or 3")
    offload = plan.get("offload_optimizer", False) if offload_optimizer is None else offload_optimizer
    if not isinstance(offload, bool):
        raise MemoError(f"{_WHO}.memo_zero_config: offload_optimizer={offload!r} must be True or False")
    if offload and stage == 0:
        raise MemoError(f"{_WHO}.memo_zero_config: offload_optimizer needs ZeRO stage 1, 2 or 3 (it offloads the "
                        f"sharded optimizer states); use stage 1 or drop offload_optimizer")
    params = plan.get("offload_params", False) if offload_params is None else offload_params
    if not isinstance(params, bool):
        raise MemoError(f"{_WHO}.memo_zero_config: offload_params={params!r} must be True or False")
    if params and (stage != 3 or not offload):
        raise MemoError(f"{_WHO}.memo_zero_config: offload_params needs ZeRO stage 3 and offload_optimizer (only "
                        f"stage 3 partitions the weights, and their gradients go to the host for CPU Adam); got "
                        f"stage {stage}{'' if offload else ' without offload_optimizer'}: use stage 3 with "
                        f"offload_optimizer=True, or drop offload_params")
    dt = dtype if dtype is not None else plan.get("dtype", "fp32")
    if str(dt).lower() not in _DTYPES:
        raise MemoError(f"{_WHO}.memo_zero_config: dtype={dt!r} is not one of bf16, fp16, fp32")
    dt = _DTYPES[str(dt).lower()]
    mb = _int(micro_batch if micro_batch is not None else plan.get("micro_batch", 1), "micro_batch", 1)
    gas = _int(gradient_accumulation_steps, "gradient_accumulation_steps", 1)

    zero: dict = {"stage": stage}
    if offload:
        # pinned host buffers make the CPU Adam's copies asynchronous; DeepSpeed pins only on accelerators
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if params:
        import torch
        # the weights live on the host and are gathered to the device layer by layer; pinned buffers make those
        # copies asynchronous on CUDA, and there is nothing to pin for without it
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if stage == 3:
        classes = layer_class_names(model) if model is not None else decoder_layer_classes(
            plan.get("model", {}).get("model_type", ""))
        if classes:
            zero["leaf_module"] = {"classes": classes}
        else:
            warnings.warn(f"{_WHO}.memo_zero_config: ZeRO stage 3 without a model (or a plan naming a known "
                          f"model_type): the config names no leaf module, so call "
                          f"memo.integrations.deepspeed.prepare(model) before the engine is created (NOTE [ ZeRO-3 "
                          f"and recomputation ] rule 5)", stacklevel=2)
    config = {
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": gas,
        "zero_optimization": zero,
        "bf16": {"enabled": dt == "bf16"},
        "fp16": {"enabled": dt == "fp16"},
        "zero_allow_untested_optimizer": True,
    }
    return config
