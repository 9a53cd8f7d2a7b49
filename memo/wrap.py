"""memo.wrap / memo.unwrap / memo.stats: install memo on a Hugging Face causal LM, in place."""

from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from memo.config import MemoConfig
from memo.errors import MemoError
from memo.runtime import MemoRuntime
from memo.stats import MemoStats

_ATTR = "_memo_runtime"
# Attention implementations whose kernel memo can see and replay (memo.trace.ATTENTION_KERNELS).
SUPPORTED_ATTENTION = ("sdpa",)


def _find_layers(model: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The decoder stack (whose forward returns the final hidden states) and its layers."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError as e:
        raise MemoError("memo.wrap: transformers is not installed; pip install transformers") from e
    base = getattr(model, "model", None) if hasattr(model, "lm_head") else model
    layers = getattr(base, "layers", None)
    if base is None or not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise MemoError(f"memo.wrap: {type(model).__name__} has no decoder stack at .model.layers; memo supports "
                        f"HF decoder-only causal LMs (Llama, Mistral, Qwen2, ...)")
    for i, layer in enumerate(layers):
        if not isinstance(layer, GradientCheckpointingLayer) or not hasattr(layer, "self_attn"):
            raise MemoError(f"memo.wrap: layer {i} ({type(layer).__name__}) is not an HF decoder layer with "
                            f"self-attention; memo supports HF decoder-only causal LMs (Llama, Mistral, Qwen2, ...)")
    return base, list(layers)


def _check_model(model: torch.nn.Module, base: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None:
        raise MemoError(f"memo.wrap: {type(model).__name__} has no HF config; wrap a transformers model")
    if getattr(config, "is_encoder_decoder", False):
        raise MemoError(f"memo.wrap: {type(model).__name__} is an encoder-decoder model; memo supports "
                        f"decoder-only causal LMs")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise MemoError(f"memo.wrap: attention implementation {impl!r} is not supported (memo must see the "
                        f"attention kernel to swap its output instead of recomputing it); load the model with "
                        f"attn_implementation='sdpa' or call model.set_attn_implementation('sdpa')")
    if any(getattr(layer, "gradient_checkpointing", False) for layer in base.layers):
        raise MemoError("memo.wrap: activation (gradient) checkpointing is enabled; memo replaces it. Call "
                        "model.activation_checkpointing_disable() before memo.wrap")


def wrap(model: torch.nn.Module, config: Optional[MemoConfig] = None) -> torch.nn.Module:
    """Install memo on ``model`` in place and return it.

    Every decoder layer but the last ``keep_last_layers`` swaps its saved activations token-wise
    to host memory; with labels the loss is computed in chunks of ``loss_chunk_size`` tokens.
    """
    config = config or MemoConfig()
    if not isinstance(config, MemoConfig):
        raise MemoError(f"memo.wrap: expected a memo.MemoConfig, got {type(config).__name__}")
    if hasattr(model, _ATTR):
        raise MemoError("memo.wrap: this model is already wrapped; call memo.unwrap(model) first to change "
                        "the configuration")
    if not config.enabled:
        return model
    base, layers = _find_layers(model)
    _check_model(model, base)
    runtime = MemoRuntime(config, layers)
    if config.sequence_parallel:
        _install_sequence_parallel(model, layers, runtime, config)
    if config.plan is not None:
        _apply_plan(model, runtime, config)
    from memo import tiling   # NOTE [ Token tiling ]
    runtime.tiled = tiling.install(layers, runtime.tile_setting,
                                   tiling.intermediate_size(model.config, model.config.hidden_size))
    for i, layer in enumerate(layers):
        runtime.originals[i] = layer.forward
        layer.forward = functools.partial(_layer_forward, runtime, i, layer)
    runtime.base = base
    runtime.original_base_forward = base.forward
    base.forward = functools.partial(_decoder_stack_forward, runtime)
    if hasattr(model, "lm_head") and (config.loss_chunk_size is not None or runtime.sp is not None):
        if config.loss_chunk_size is not None:
            _check_chunkable(model)
        runtime.original_model_forward = model.forward
        model.forward = functools.partial(_causal_lm_forward, model, runtime)
        norm = getattr(base, "norm", None)
        if config.loss_chunk_size is not None and config.fuse_final_norm and isinstance(norm, torch.nn.Module):
            # NOTE [ Chunked loss with the final norm ] in memo/loss.py: the decoder stack skips its
            # final norm while the chunked loss runs it chunk by chunk.
            runtime.final_norm, runtime.final_norm_deferred = norm, False
            runtime.original_norm_forward = norm.forward
            norm.forward = functools.partial(_final_norm_forward, runtime)
    if runtime.sp is None:   # NOTE [ Grouped heads and the math path ] in memo/attention/sdpa.py
        from memo.attention.hf import bind
        from memo.attention.sdpa import install as install_sdpa
        from memo.parallel.groups import one_process
        runtime.original_attn_implementation = install_sdpa(model)
        runtime.sp_binding = bind(layers, one_process())   # packed batches: NOTE [ Packed documents ]
    setattr(model, _ATTR, runtime)
    return model


def _final_norm_forward(runtime: MemoRuntime, hidden_states, *args, **kwargs):
    if runtime.final_norm_deferred:
        return hidden_states
    return runtime.original_norm_forward(hidden_states, *args, **kwargs)


def _layer_forward(runtime: MemoRuntime, index: int, layer: torch.nn.Module, hidden_states, *args, **kwargs):
    return runtime.run_layer(index, layer, hidden_states, args, kwargs)


_LOSS_ONLY = ("shift_labels", "num_items_in_batch")


def _decoder_stack_forward(runtime: MemoRuntime, *args, **kwargs):
    """The decoder stack's forward; whether it returns or raises, the in-flight layers are drained.

    Draining on an exception matters: an in-flight layer references its saved tensors, whose
    autograd nodes reference the layer's handles, a cycle that only the release breaks.
    """
    # Loss-only arguments: transformers' CausalLM forward hands its **kwargs to the decoder stack
    # too; no layer reads them, and memo could not slice a per-token one for recomputation.
    kwargs = {k: v for k, v in kwargs.items() if k not in _LOSS_ONLY}
    try:
        if runtime.sp is not None:
            kwargs = _sequence_parallel_call(runtime, args, kwargs)
            return runtime.original_base_forward(*args, **kwargs)
        from memo.attention.hf import packed_call
        from memo.attention.sdpa import packed_forward
        kwargs, packed = packed_call(runtime.sp_binding, args, kwargs)   # NOTE [ Packed documents ]
        with packed_forward(packed):
            return runtime.original_base_forward(*args, **kwargs)
    finally:
        runtime.end_forward()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Remove memo from ``model`` (in place) and return it."""
    runtime: Optional[MemoRuntime] = getattr(model, _ATTR, None)
    if runtime is None:
        raise MemoError("memo.unwrap: this model is not wrapped by memo; nothing to unwrap")
    for i, layer in enumerate(runtime.layers):
        if "forward" in layer.__dict__:
            del layer.forward
    from memo import tiling
    tiling.uninstall(runtime.tiled)
    del runtime.base.forward
    if getattr(runtime, "original_model_forward", None) is not None:
        del model.forward
    if getattr(runtime, "final_norm", None) is not None:
        del runtime.final_norm.forward
    if runtime.sp is not None:
        from memo.attention.hf import uninstall
        uninstall(model, runtime.layers, runtime.original_attn_implementation)
    else:
        from memo.attention.hf import unbind
        unbind(runtime.layers)
        if runtime.original_attn_implementation is not None:
            model.set_attn_implementation(runtime.original_attn_implementation)
    runtime.close()
    delattr(model, _ATTR)
    return model


def stats(model: torch.nn.Module) -> MemoStats:
    """What memo swapped, recomputed and kept for each layer in the last step, with pool and timings."""
    runtime: Optional[MemoRuntime] = getattr(model, _ATTR, None)
    if runtime is None:
        raise MemoError("memo.stats: this model is not wrapped by memo; call memo.wrap(model) first")
    return runtime.stats()


def runtime_of(model: torch.nn.Module) -> MemoRuntime:
    runtime = getattr(model, _ATTR, None)
    if runtime is None:
        raise MemoError("memo: this model is not wrapped by memo; call memo.wrap(model) first")
    return runtime


# --- chunked loss ------------------------------------------------------------------------------
# Model types whose CausalLM head is ``lm_head(hidden)`` then (optionally) Cohere's logit scale or a
# final soft-cap, then ``ForCausalLMLoss`` -- what the chunked loss reproduces. Others (Granite
# divides the logits by ``logits_scaling``, ...) are refused rather than silently changed.
CHUNKABLE_HEADS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "cohere", "cohere2", "phi3", "olmo", "olmo2", "starcoder2", "smollm3", "glm", "stablelm",
})


def _check_chunkable(model: torch.nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in CHUNKABLE_HEADS:
        raise MemoError(f"memo.wrap: the chunked loss does not know the LM head of model type {model_type!r} "
                        f"(it may scale its logits); pass MemoConfig(loss_chunk_size=None) to keep the model's own "
                        f"head and loss")
    if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
        raise MemoError("memo.wrap: the model's lm_head is not a Linear layer; pass MemoConfig(loss_chunk_size=None)")


def _causal_lm_forward(model, runtime: MemoRuntime, input_ids=None, attention_mask=None, position_ids=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The CausalLM forward with the LM head and loss computed in chunks when labels are given.

    Under sequence parallelism the loss is the whole sequence's on every rank (NOTE [ Sequence-parallel loss ]).
    """
    if labels is None:
        return runtime.original_model_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from memo.loss import chunked_causal_lm_loss, head_options_from_config

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    if runtime.sp is not None:
        num_items = _sequence_parallel_items(runtime, labels, shift_labels, num_items)
    if runtime.config.loss_chunk_size is None:
        out = runtime.original_model_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
            logits_to_keep=logits_to_keep, num_items_in_batch=num_items, shift_labels=shift_labels, **kwargs)
        out.loss = _sequence_parallel_loss(runtime, out.loss)
        return out
    norm = getattr(runtime, "final_norm", None)
    if kwargs.get("output_hidden_states") or getattr(model.config, "output_hidden_states", False):
        norm = None   # the caller reads the normed last hidden state: the stack applies the norm itself
    runtime.final_norm_deferred = norm is not None
    try:
        outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds,
                              use_cache=False if use_cache is None else use_cache, **kwargs)
    finally:
        runtime.final_norm_deferred = False
    hidden = outputs.last_hidden_state   # the final norm's input when ``norm`` is fused into the loss
    loss = chunked_causal_lm_loss(hidden, model.lm_head.weight, None if shift_labels is not None else labels,
                                  chunk_size=runtime.config.loss_chunk_size,
                                  bias=model.lm_head.bias, num_items_in_batch=num_items, shift_labels=shift_labels,
                                  norm=norm, **head_options_from_config(model.config))
    loss = _sequence_parallel_loss(runtime, loss)
    # (the cache field: "cache" since transformers 5.x, a cache passed in as "past_key_values" or "cache"
    # travels in **kwargs)
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=getattr(outputs, "cache", None),
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _apply_plan(model, runtime: MemoRuntime, config: MemoConfig) -> None:
    """Take the swap ratio from a plan file made by ``memo plan --out``; refuse a plan for another model.

    The model is checked here; sequence length, micro-batch and dtype at the first forward
    (``MemoRuntime.check_plan``), before any layer computes.
    """
    from memo.planner.planfile import PlanFileError, PlanMismatch, check_plan_matches, load_plan
    from memo.profile import model_identity
    try:
        plan = load_plan(config.plan)
        check_plan_matches(plan, model=model_identity(model.config), seq_len=plan["seq_len"],
                           micro_batch=plan["micro_batch"], dtype=plan["dtype"], sp=plan["sp"])
    except (PlanFileError, PlanMismatch) as e:
        raise MemoError(str(e)) from e
    if config.swap_ratio != "auto" and float(config.swap_ratio) != float(plan["alpha"]):
        warnings.warn(f"memo.wrap: swap_ratio={config.swap_ratio} is overridden by the plan's alpha "
                      f"{plan['alpha']} ({config.plan})", stacklevel=3)
    runtime.plan = plan
    runtime.alpha = float(plan["alpha"])
    runtime.alpha_reason = f"from plan {config.plan}"
    _apply_plan_layers(runtime, config, plan)


def _apply_plan_layers(runtime: MemoRuntime, config: MemoConfig, plan: dict) -> None:
    """The plan's layer policies, kept layers and tile (NOTE [ Layer policies ] rule 2 in memo/executor.py)."""
    n = len(runtime.layers)
    policies = plan.get("layer_policies")
    if policies is None:   # plans made before policies existed: "memo" but the last keep_layers
        keep = int(plan.get("keep_layers", config.keep_last_layers))
        policies = ["memo"] * max(n - keep, 0) + ["kept"] * min(keep, n)
    if len(policies) != n:
        raise MemoError(f"memo.wrap: plan {config.plan} has layer_policies for {len(policies)} layers, the model has "
                        f"{n}; make the plan for this model with `memo plan`")
    keep = policies.count("kept")
    if config.keep_last_layers_given and keep != config.keep_last_layers:
        # NOTE [ A plan decides the layers ] in memo/config.py
        raise MemoError(f"memo.wrap: keep_last_layers={config.keep_last_layers} contradicts plan {config.plan}, which "
                        f"keeps {keep} layer(s) on the device (its memory and times were computed for that): drop "
                        f"keep_last_layers to run the plan's layers, or make a plan with `memo plan ... --keep-layers "
                        f"{config.keep_last_layers}`")
    runtime.swapped = {i for i, p in enumerate(policies) if p != "kept"}
    runtime.plan_policies = {i: p for i, p in enumerate(policies) if p != "kept"}
    runtime.policies = dict(runtime.plan_policies)
    for i, st in runtime.layer_stats.items():
        st.kept = i not in runtime.swapped
        st.policy = policies[i]
    if "tile_tokens" in plan and config.tile_tokens == "auto":
        runtime.tile_setting = plan["tile_tokens"]   # the tile the plan's memory was computed with



# --- sequence parallelism ----------------------------------------------------------------------
# NOTE [ Sequence-parallel loss ]
#
# 1. Each rank holds S/P tokens and their (already shifted) labels. The loss every rank returns
#    is the whole sequence's: the sum over all ranks' non-ignored tokens divided by their count.
# 2. The count is summed over the group (``num_items_in_batch``, if given, is this rank's count,
#    as transformers' Trainer computes it from the batch it sees, and is summed likewise).
# 3. The returned value is local + (sum of all locals - local), the bracket detached: every rank
#    reports the same number, and backward gives each rank the gradient of its own tokens' share.
#    ``memo.parallel.all_reduce_gradients`` (or a data-parallel wrapper reducing over the SP ranks
#    too) sums those shares into the full-sequence gradient.


def _install_sequence_parallel(model, layers, runtime: MemoRuntime, config: MemoConfig) -> None:
    from memo.attention.hf import install
    from memo.attention.ulysses import check_heads
    from memo.parallel.groups import sequence_parallel
    group = config.sequence_parallel_group
    sp = sequence_parallel(group, size=None if group is not None else config.sequence_parallel_size,
                           backend=config.sp_backend, layout=config.sp_layout, ulysses_size=config.ulysses_size,
                           timeout_s=config.sp_timeout_s)
    if config.sequence_parallel_size is not None and sp.size != config.sequence_parallel_size:
        raise MemoError(f"memo.wrap: sequence_parallel_size={config.sequence_parallel_size} but the group has "
                        f"{sp.size} ranks; pass one of them, or both consistently")
    check_heads(sp, model.config.num_attention_heads)
    runtime.sp = sp
    runtime.original_attn_implementation = model.config._attn_implementation
    runtime.sp_binding = install(model, layers, sp)


def _sequence_parallel_call(runtime: MemoRuntime, args: tuple, kwargs: dict) -> dict:
    """Global positions and document ids for this forward; the mask checked and dropped.

    One small all-gather per forward, made by every rank: (batch, local length, packed?, input
    ok?). A problem on one rank is raised on all of them (one rank raising alone would leave the
    others waiting in the first ring exchange until the timeout).
    """
    from memo.parallel.comm import all_gather
    from memo.parallel.layout import shard_indices
    sp = runtime.sp
    sp.generation += 1   # attention shape checks run again in this forward (memo.parallel.comm.check_same)
    if len(args) > 1:
        raise MemoError("memo.wrap: under sequence parallelism pass attention_mask and position_ids to the model "
                        "as keywords")
    ref = next((t for t in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args[:1]) if t is not None), None)
    if ref is None:
        raise MemoError("memo.wrap: the model was called without input_ids or inputs_embeds")
    b, s = ref.shape[0], ref.shape[1]
    problem = None
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2 or not bool(mask.bool().all()):
            problem = MemoError("memo.wrap: under sequence parallelism attention_mask must be all ones (or None): "
                                "memo.parallel.shard_batch turns right padding into ignored labels, and packed "
                                "documents are given by position_ids restarting at 0")
        kwargs = dict(kwargs, attention_mask=None)
    global_idx = shard_indices(s * sp.size, sp.size, sp.rank, sp.layout, ref.device)
    positions = kwargs.get("position_ids")
    doc = None
    if positions is None:
        kwargs = dict(kwargs, position_ids=global_idx.unsqueeze(0))
    elif positions.shape[-1] != s:
        problem = problem or MemoError(f"memo.wrap: position_ids have {positions.shape[-1]} positions for {s} local "
                                       f"tokens")
    else:
        doc = (global_idx - positions).expand(b, s).contiguous()
    packed = doc is not None and bool((doc != 0).any())
    mine = torch.tensor([b, s, int(packed), int(problem is None), int(doc is not None)], device=ref.device)
    every = [g.cpu().tolist() for g in all_gather(sp, mine, "forward check")]
    if problem is not None:
        raise problem
    bad = [sp.ranks[i] for i, g in enumerate(every) if not g[3]]
    if bad:
        raise MemoError(f"memo.wrap: rank(s) {bad} refused this forward's input (see their error); every rank of a "
                        f"sequence-parallel group stops with it")
    if any(g[:2] != every[0][:2] for g in every):
        rows = "; ".join(f"rank {sp.ranks[i]}: batch {g[0]}, local length {g[1]}" for i, g in enumerate(every))
        raise MemoError(f"memo.wrap: the ranks of one sequence differ in batch or local length ({rows}); shard one "
                        f"batch with memo.parallel.shard_batch on every rank")
    with_positions = [sp.ranks[i] for i, g in enumerate(every) if g[4]]
    if with_positions and len(with_positions) != len(every):
        raise MemoError(f"memo.wrap: position_ids were given on rank(s) {with_positions} only; give every rank of a "
                        f"sequence-parallel group its shard (memo.parallel.shard_batch) or none")
    if with_positions:   # NOTE [ Packed documents ] rule 4: the same error on every rank
        from memo.parallel.documents import check_sharded
        check_sharded(sp, positions.expand(b, s), global_idx, "memo.wrap")
    runtime.sp_binding.doc = doc if any(g[2] for g in every) else None
    return kwargs


def _sequence_parallel_items(runtime: MemoRuntime, labels, shift_labels, num_items):
    """The group's count of non-ignored tokens (NOTE [ Sequence-parallel loss ] rule 2)."""
    from memo.parallel.comm import all_reduce
    if shift_labels is None:
        raise MemoError("memo.wrap: under sequence parallelism the labels must be shifted before the sequence is "
                        "sharded, or the last token of every shard loses its label; pass the batch through "
                        "memo.parallel.shard_batch, which adds shift_labels")
    if num_items is None:
        count = (shift_labels != -100).sum().to(torch.float32)
    else:
        count = torch.as_tensor(num_items, dtype=torch.float32, device=shift_labels.device).clone()
    return all_reduce(runtime.sp, count.reshape(1), "loss token count")[0]


def _sequence_parallel_loss(runtime: MemoRuntime, local):
    """NOTE [ Sequence-parallel loss ] rule 3."""
    if runtime.sp is None or local is None:
        return local
    from memo.parallel.comm import all_reduce
    total = all_reduce(runtime.sp, local.detach().clone().reshape(1), "loss")[0]
    return local + (total - local.detach())
