"""The paper's swap-ratio program (MEMO, section on token-wise swapping). Torch-free.

    maximise alpha in [0, 1]
    subject to (S_in + S_attn + alpha * S_other) / B          <= T_fwd     (copies hide)
               (n - k) * (S_in + S_attn + alpha * S_other)    <= M_host    (host holds it)

It has a closed form: each constraint is an upper bound on alpha.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class AlphaResult:
    alpha: float
    time_bound: float       # largest alpha whose copies hide behind one layer's forward
    memory_bound: float     # largest alpha the host budget holds
    hidden: bool            # True when even input + attention output copies hide behind compute
    fits: bool              # True when input + attention output of every swapped layer fit on host
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def _bound(budget: float, fixed: float, per_alpha: float) -> float:
    if per_alpha <= 0:
        return 1.0 if budget >= fixed else 0.0
    return (budget - fixed) / per_alpha


def solve_alpha(
    *,
    s_in: float,
    s_attn: float,
    s_other: float,
    bandwidth: float,
    t_fwd: float,
    n_layers: int,
    keep_layers: int,
    host_budget: float,
) -> AlphaResult:
    """Largest swap ratio whose copies hide behind compute and whose bytes fit the host budget.

    Sizes are bytes of one layer on one rank; ``bandwidth`` is device-to-host bytes/s; ``t_fwd``
    is one layer's forward time in seconds; ``host_budget`` is bytes of host memory this rank may
    use. When even ``s_in + s_attn`` cannot hide, ``hidden`` is False and alpha is 0: the caller
    must say so (the copies will then be exposed).
    """
    if min(s_in, s_attn, s_other, bandwidth, t_fwd, host_budget) < 0 or bandwidth == 0:
        raise ValueError("memo.planner.alpha: sizes, times and budgets must be non-negative and bandwidth > 0")
    swapped_layers = max(n_layers - keep_layers, 0)
    fixed = s_in + s_attn
    time_bound = _bound(bandwidth * t_fwd, fixed, s_other)
    memory_bound = 1.0 if swapped_layers == 0 else _bound(host_budget / swapped_layers, fixed, s_other)
    hidden = fixed / bandwidth <= t_fwd
    fits = swapped_layers == 0 or swapped_layers * fixed <= host_budget
    alpha = max(0.0, min(1.0, time_bound, memory_bound))
    if not fits:
        reason = (f"host budget {host_budget:.3g} B cannot hold the layer inputs and attention outputs of "
                  f"{swapped_layers} layers ({swapped_layers * fixed:.3g} B)")
    elif not hidden:
        reason = (f"copying input + attention output ({fixed:.3g} B) takes {fixed / bandwidth:.3g} s, longer "
                  f"than the layer's forward ({t_fwd:.3g} s): copies cannot hide, alpha = 0")
    elif alpha >= 1.0:
        reason = "everything fits and hides: swap all tokens"
    elif time_bound <= memory_bound:
        reason = f"limited by copy time: alpha = {alpha:.3f}"
    else:
        reason = f"limited by host memory: alpha = {alpha:.3f}"
    return AlphaResult(alpha=alpha, time_bound=max(0.0, min(1.0, time_bound)),
                       memory_bound=max(0.0, min(1.0, memory_bound)), hidden=hidden, fits=fits, reason=reason)


# NOTE [ Step-time program ]
#
# ``solve_alpha`` above is the paper's program: the largest alpha whose copies hide. At run time
# memo minimises the step time instead, from one measured step at ratio ``a`` (true device times:
# a swapped layer's forward t_f and backward t_b, recompute seconds per token c, copy bandwidths
# B_d2h and B_h2d measured on the copy streams). Per swapped layer, with T tokens per layer call:
#
#   copy(alpha)    = (S_in + S_attn + alpha * S_other) / B        (each way)
#   recompute      = (1 - alpha) * T * c
#   exposed out    = max(0, copy_d2h(alpha) - t_f)                 layer i's copies run under layer i+1
#   exposed in     = max(0, copy_h2d(alpha) - t_b - recompute)     layer i-1's under layer i's backward
#   cost(alpha)    = recompute + exposed out + exposed in
#
# predicted step(alpha) = measured step + n * (cost(alpha) - cost(a)): everything else in the step
# (kept layers, head, loss) does not depend on alpha. cost is convex and piecewise linear (a sum
# of a line and maxima of lines), so its minimum over [0, memory bound] lies at an end or a kink;
# among equal minima the largest alpha is taken (the paper's objective breaks the tie).


@dataclass(frozen=True)
class MeasuredStep:
    """One measured step at swap ratio ``alpha``; times in seconds, bandwidths in bytes/s."""

    alpha: float
    step_s: float
    layer_forward_s: float
    layer_backward_s: float
    recompute_s_per_token: float
    tokens: int                 # tokens of one layer call on this rank (batch x sequence)
    d2h_bandwidth: float
    h2d_bandwidth: float


@dataclass(frozen=True)
class StepAlphaResult:
    alpha: float
    predicted_step_s: float
    memory_bound: float
    time_bound: float           # largest alpha whose copies out hide behind a layer's forward
    hidden: bool                # the copies at alpha = 0 hide (out and in)
    candidates: tuple           # (alpha, predicted step seconds) at every end and kink considered
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def layer_swap_cost(alpha: float, m: MeasuredStep, *, s_fixed: float, s_other: float) -> float:
    """Seconds one swapped layer adds to a step at ``alpha``: recompute plus exposed copies."""
    copied = s_fixed + alpha * s_other
    recompute = (1.0 - alpha) * m.tokens * m.recompute_s_per_token
    exposed_out = max(0.0, copied / m.d2h_bandwidth - m.layer_forward_s)
    exposed_in = max(0.0, copied / m.h2d_bandwidth - m.layer_backward_s - recompute)
    return recompute + exposed_out + exposed_in


def predict_step_s(alpha: float, m: MeasuredStep, *, s_fixed: float, s_other: float, swapped_layers: int) -> float:
    """Step seconds at ``alpha`` predicted from the step measured at ``m.alpha``. See NOTE [ Step-time program ]."""
    def cost(a: float) -> float:
        return layer_swap_cost(a, m, s_fixed=s_fixed, s_other=s_other)

    return m.step_s + swapped_layers * (cost(alpha) - cost(m.alpha))


def solve_step_alpha(m: MeasuredStep, *, s_fixed: float, s_other: float, swapped_layers: int,
                     host_budget: float) -> StepAlphaResult:
    """The alpha in [0, memory bound] with the smallest predicted step time (NOTE [ Step-time program ]).

    ``s_fixed``: host bytes of one layer's input and attention output (swapped at every alpha);
    ``s_other``: host bytes of the rest at alpha = 1; ``host_budget``: bytes for all swapped layers.
    """
    if min(s_fixed, s_other, host_budget, m.step_s, m.layer_forward_s, m.layer_backward_s,
           m.recompute_s_per_token) < 0 or m.d2h_bandwidth <= 0 or m.h2d_bandwidth <= 0 or m.tokens <= 0:
        raise ValueError(f"memo.planner.alpha: sizes, times and budgets must be non-negative, bandwidths and "
                         f"tokens > 0; got {m} s_fixed={s_fixed} s_other={s_other} host_budget={host_budget}")
    memory_bound = 1.0 if swapped_layers == 0 else max(0.0, min(1.0, _bound(host_budget / swapped_layers,
                                                                            s_fixed, s_other)))
    time_bound = max(0.0, min(1.0, _bound(m.d2h_bandwidth * m.layer_forward_s, s_fixed, s_other)))
    recompute_all = m.tokens * m.recompute_s_per_token
    kinks = [time_bound]
    if s_other > 0:   # copy in = backward + recompute
        slope = s_other / m.h2d_bandwidth + recompute_all
        kinks.append((m.layer_backward_s + recompute_all - s_fixed / m.h2d_bandwidth) / slope)
    points = sorted({0.0, memory_bound, *(min(max(k, 0.0), memory_bound) for k in kinks)})
    kw = dict(s_fixed=s_fixed, s_other=s_other, swapped_layers=swapped_layers)
    candidates = tuple((a, predict_step_s(a, m, **kw)) for a in points)
    best_s = min(s for _, s in candidates)
    alpha = max(a for a, s in candidates if s <= best_s + 1e-12 * max(1.0, abs(best_s)))
    predicted = predict_step_s(alpha, m, **kw)
    hidden = layer_swap_cost(0.0, m, s_fixed=s_fixed, s_other=s_other) <= recompute_all * (1 + 1e-12)
    if alpha == 0.0 and not hidden:
        reason = (f"copies of the layer inputs and attention outputs ({s_fixed:.3g} B per layer) cannot hide "
                  f"behind compute even at alpha = 0")
    elif alpha >= memory_bound and memory_bound < 1.0:
        reason = f"limited by host memory: alpha = {alpha:.3f}"
    elif alpha >= 1.0:
        reason = "every copy hides: swap all tokens"
    elif alpha == 0.0:
        reason = "recomputing is cheaper than any exposed copy: alpha = 0"
    else:
        reason = f"copies hide up to alpha = {alpha:.3f}; beyond, exposed copies cost more than recompute saves"
    return StepAlphaResult(alpha=alpha, predicted_step_s=predicted, memory_bound=memory_bound,
                           time_bound=time_bound, hidden=hidden, candidates=candidates, reason=reason)
