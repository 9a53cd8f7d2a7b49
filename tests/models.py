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
