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
    if config.plan is not None:
        _apply_plan(model, runtime, config)
    for i, layer in enumerate(layers):
        runtime.originals[i] = layer.forward
        layer.forward = functools.partial(_layer_forward, runtime, i, layer)
    runtime.base = base
    runtime.original_base_forward = base.forward
    base.forward = functools.partial(_decoder_stack_forward, runtime)
    if config.loss_chunk_size is not None and hasattr(model, "lm_head"):
        _check_chunkable(model)
        runtime.original_model_forward = model.forward
        model.forward = functools.partial(_causal_lm_forward, model, runtime)
    setattr(model, _ATTR, runtime)
    return model


def _layer_forward(runtime: MemoRuntime, index: int, layer: torch.nn.Module, hidden_states, *args, **kwargs):
    return runtime.run_layer(index, layer, hidden_states, args, kwargs)


def _decoder_stack_forward(runtime: MemoRuntime, *args, **kwargs):
    """The decoder stack's forward; whether it returns or raises, the in-flight layers are drained.

    Draining on an exception matters: an in-flight layer references its saved tensors, whose
    autograd nodes reference the layer's handles, a cycle that only the release breaks.
    """
    try:
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
    del runtime.base.forward
    if getattr(runtime, "original_model_forward", None) is not None:
        del model.forward
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
                       past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                       **kwargs):
    """The CausalLM forward with the LM head and loss computed in chunks when labels are given."""
    if labels is None:
        return runtime.original_model_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from memo.loss import chunked_causal_lm_loss, head_options_from_config

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = model.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                          use_cache=False if use_cache is None else use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    loss = chunked_causal_lm_loss(hidden, model.lm_head.weight, labels, chunk_size=runtime.config.loss_chunk_size,
                                  bias=model.lm_head.bias, num_items_in_batch=num_items, shift_labels=shift_labels,
                                  **head_options_from_config(model.config))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
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
