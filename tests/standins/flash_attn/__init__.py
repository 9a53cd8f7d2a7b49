"""A stand-in for flash-attn on the CPU, for testing memo's adapter (tests only; never installed).

It follows flash-attn 2.7/2.8's documented layouts: q/k/v/out (batch, seqlen, heads, head_dim),
softmax_lse (batch, heads, seqlen) fp32, backward filling dq/dk/dv in place from the given out and
lse. The arithmetic is torch's CPU flash kernel, so only the layouts and calling convention are
under test. ``CALLS`` counts calls so tests can see that the adapter was used.
"""

__version__ = "2.8.0-standin"
