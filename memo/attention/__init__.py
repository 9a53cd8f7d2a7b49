"""Attention backends: ring, Ulysses and hybrid sequence parallelism, and their HF registration."""

from memo.attention.api import ring_attention, sp_attention_bshd

__all__ = ["ring_attention", "sp_attention_bshd"]
