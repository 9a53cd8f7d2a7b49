"""Small models with real architectures, built from configs (no downloads)."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
    Qwen2ForCausalLM

DIMS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, use_cache=False, attn_implementation="sdpa")

KINDS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 4096}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
}


def build(kind: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = KINDS[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**DIMS, **extra, **overrides})
    return model_cls(config)


def batch(batch_size: int, seq: int, vocab: int = 128, seed: int = 1, pad_last: int = 0):
    """Token ids and labels; the last sample's final ``pad_last`` tokens are padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    labels = ids.clone()
    if pad_last:
        mask[-1, -pad_last:] = 0
        labels[-1, -pad_last:] = -100
    return ids, mask, labels


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def run_step(model, micro_batches, dtype=None) -> tuple[list, dict]:
    """Forward and backward over micro-batches (gradient accumulation); returns losses and grads."""
    model.zero_grad(set_to_none=True)
    losses = []
    for ids, mask, labels in micro_batches:
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        (out.loss / len(micro_batches)).backward()
        losses.append(out.loss.detach())
    return losses, grads(model)


def twin(model, dtype=None):
    m = copy.deepcopy(model)
    return m.to(dtype) if dtype is not None else m


def planner_layer(model: dict, batch_size: int, seq: int):
    """A real fp32 decoder layer built from a planner model dict (memo.profile's config), a random
    input that requires grad, and the shared arguments (RoPE cos/sin; None for gpt2)."""
    from memo.profile import _layer_classes, hf_config_from_model
    torch.manual_seed(0)
    cfg = hf_config_from_model(model)
    layer_cls, rope_cls, _ = _layer_classes(cfg)
    layer = layer_cls(cfg, layer_idx=0)
    x = torch.randn(batch_size, seq, model["hidden"], requires_grad=True)
    shared = None
    if model["model_type"] != "gpt2":
        shared = tuple(t.detach() for t in rope_cls(cfg)(x, torch.arange(seq).unsqueeze(0)))
    return layer, x, shared


class AllocatesInBackward(torch.autograd.Function):
    """x -> 2x; its backward makes (and frees) one ``nbytes`` request of a memo.arena.ArenaReplay."""

    @staticmethod
    def forward(ctx, x, arena, nbytes=512):
        ctx.arena, ctx.nbytes = arena, nbytes
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        ctx.arena.free(ctx.arena.allocate(ctx.nbytes))
        return grad * 2, None, None
