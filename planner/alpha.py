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
