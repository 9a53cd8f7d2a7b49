"""The longest sequence that fits: length searches and what stops a plan from fitting. Torch-free.

The searches take a callable that plans one length (the CLI profiles the layer at that length
and plans it with greedy layouts); fit is assumed monotone in length.
"""

from __future__ import annotations

from typing import Callable

from .units import format_bytes


def max_fitting_seq_len(fits_at: Callable[[int], bool], *, start: int, granularity: int,
                        upper: int = 1 << 27) -> int:
    """Largest multiple of ``granularity`` for which ``fits_at`` holds (0 when even the smallest
    does not), by doubling from ``start`` and bisecting. Assumes fit is monotone in length."""
    g = granularity
    lo, hi = 0, None
    s = max(g, start // g * g)
    while s <= upper:
        if fits_at(s):
            lo = s
            s *= 2
        else:
            hi = s
            break
    if hi is None:
        return lo
    if lo == 0:
        # Nothing fitted yet: search downwards.
        s = hi // 2 // g * g
        while s >= g and not fits_at(s):
            hi, s = s, s // 2 // g * g
        if s < g:
            return 0
        lo = s
    while hi - lo > g:
        mid = (lo + hi) // 2 // g * g
        if mid <= lo:
            break
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo


def max_fitting_seq_len_interp(evaluate: Callable[[int], tuple[bool, float]], *, start: int, granularity: int,
                               upper: int = 1 << 27, max_evals: int = 40) -> int:
    """Largest multiple of ``granularity`` in ``[granularity, upper]`` that fits, where
    ``evaluate(s)`` is ``(fits, excess)`` and ``excess`` (how far from fitting: > 0 does not fit,
    <= 0 fits) is close to linear in ``s``. Like ``max_fitting_seq_len`` but proposes each length
    by linear interpolation of ``excess`` between the two nearest lengths tried (bisection when that
    does not narrow the bracket), so a few evaluations suffice. Assumes fit is monotone in length."""
    g = granularity
    upper = upper // g * g
    if upper < g:
        return 0
    seen: dict[int, tuple[bool, float]] = {}

    def ev(s: int) -> tuple[bool, float]:
        if s not in seen:
            seen[s] = evaluate(s)
        return seen[s]

    def snap(x: float) -> int:
        return min(max(g, int(x) // g * g), upper)

    lo, hi = 0, upper + g           # fits at lo (0: none yet), not at hi
    s = snap(start)
    prev = None
    while hi - lo > g and len(seen) < max_evals:
        fits, excess = ev(s)
        if fits:
            lo = max(lo, s)
        else:
            hi = min(hi, s)
        if hi - lo <= g:
            break
        # Propose the root of the line through the last two points, kept strictly inside (lo, hi).
        guess = None
        if prev is not None and prev[0] != s and excess != prev[1]:
            guess = s - excess * (s - prev[0]) / (excess - prev[1])
        elif excess != 0:
            guess = s * (2.0 if fits else 0.5)
        prev = (s, excess)
        nxt = snap(guess) if guess is not None else (lo + hi) // 2 // g * g
        if fits and nxt == s:
            nxt = s + g                     # the root is within one step: check the next length
        if not lo < nxt < hi or nxt in seen:
            nxt = (lo + hi) // 2 // g * g
            if not lo < nxt < hi:
                break
        s = nxt
    return lo if lo <= upper else 0


def what_limits(plan: dict) -> dict:
    """What stops ``plan`` from fitting: ``{"kind": "weights and states" | "device arena" | "host memory" | "",
    "detail": ...}``; a device limit also says whether the plan offloads the parameters (``offload_params``)."""
    if plan["fits"]:
        return {"kind": "", "detail": ""}
    gpu_mem = plan["gpu"]["memory_bytes"]
    st = plan["model_states"]
    if any(r.startswith("host") for r in plan["reasons"]):
        return {"kind": "host memory", "detail": "; ".join(r for r in plan["reasons"] if r.startswith("host"))}
    states = st["device_total"] + plan["reserve_bytes"]
    # NOTE [ Parameter offload ] in cost.py: what the model states are, and whether they could leave the GPU.
    if plan.get("offload_params"):
        held = "parameters offloaded: the ZeRO-3 gather buffer and one module's gradients"
    else:
        held = (f"weights and gradients on the GPU; --offload-params (ZeRO-3, --offload-optimizer) moves them to the "
                f"host")
    if states >= gpu_mem:
        return {"kind": "weights and states",
                "detail": f"weights, gradients and optimizer states need {format_bytes(states)} per GPU with the "
                          f"reserve, of {format_bytes(gpu_mem)} ({held})", "offload_params": plan.get("offload_params", False)}
    live = plan["step"]["live_at_peak"]
    arena = max((b for k, b in live.items() if k.endswith((".bwd", ".fwd"))), default=0)
    state_live = sum(b for k, b in live.items() if k in ("weights", "gradients", "optimizer", "zero3_gather",
                                                          "grads.rest") or k.endswith(".grad"))
    other = plan["step"]["peak_bytes"] - arena - state_live
    at = plan["step"]["step_labels"][plan["step"]["peak_step"]]
    return {"kind": "device arena",
            "detail": f"at {at}: layer arena {format_bytes(arena)} (backward {format_bytes(plan['layer']['backward']['peak_bytes'])}, "
                      f"forward {format_bytes(plan['layer']['forward']['peak_bytes'])}) + model states "
                      f"{format_bytes(state_live)} ({held}) + swap/recompute/head blocks {format_bytes(other)} + "
                      f"reserve {format_bytes(plan['reserve_bytes'])} = "
                      f"{format_bytes(plan['predicted']['device_peak_bytes'])} of {format_bytes(gpu_mem)}",
            "layer_arena_bytes": arena, "model_state_bytes": state_live, "other_bytes": other,
            "offload_params": plan.get("offload_params", False)}
