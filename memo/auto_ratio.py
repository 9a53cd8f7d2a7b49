"""``swap_ratio="auto"``: measure steps, solve the step-time program, check it, settle.

# NOTE [ Auto swap ratio ]
#
# 1. WARMUP: the first step runs at the measuring ratio (0: the least host memory, and every
#    token of the other activations is recomputed, so the recompute cost per token is measured on
#    all of them). Its times are discarded (first allocations, kernel autotuning, lazy set-up).
# 2. MEASURE: the next step, at the same ratio, is the first measured one. The step-time program
#    (NOTE [ Step-time program ] in planner/alpha.py) chooses a ratio and predicts its step time.
# 3. STEADY: one step at the chosen ratio. Its measured time is compared with the prediction, and
#    the program is solved once more from it (steady state: copies overlap compute as they will
#    from now on). Within ``TOLERANCE``: the re-solved ratio is kept; done.
# 4. NEIGHBOURS: otherwise the model does not describe this machine. One step runs at each
#    neighbour of the chosen ratio (+- ``NEIGHBOUR_STEP``, within [0, memory bound], whole tokens)
#    and the fastest measured ratio is kept, the measuring ratio's step included.
# 5. The runtime applies ``ratio`` at step boundaries only (NOTE [ Host pool sizing ] in
#    memo/runtime.py). A step that ran at another ratio than the one asked for is reported and
#    not used.
"""

from __future__ import annotations

import enum
import statistics
from typing import Callable, Optional

from memo.planner.alpha import MeasuredStep, StepAlphaResult, predict_step_s, solve_step_alpha
from memo.swap.timing import StepTimes

TOLERANCE = 0.10        # prediction vs measurement, relative to the measurement
NEIGHBOUR_STEP = 0.1    # the ratios of the table are 0.1 apart
MEASURING_RATIO = 0.0


class AutoPhase(enum.Enum):
    WARMUP = "warm-up"
    MEASURE = "measure"
    STEADY = "steady"
    NEIGHBOURS = "neighbours"
    SETTLED = "settled"


class AutoRatio:
    """The protocol of NOTE [ Auto swap ratio ] for one set of layer shapes.

    ``s_fixed`` / ``s_other``: host bytes per swapped layer (see ``solve_step_alpha``);
    ``swapped``: indices of the swapped layers; ``tokens``: batch x sequence of one layer call;
    ``quantize``: the largest ratio <= its argument that is a whole number of tokens.
    """

    def __init__(self, *, s_fixed: float, s_other: float, swapped: list[int], tokens: int, seq: int,
                 host_budget: float, quantize: Callable[[float], float]) -> None:
        self.s_fixed, self.s_other = s_fixed, s_other
        self.swapped, self.tokens, self.seq = list(swapped), tokens, seq
        self.host_budget = host_budget
        self.quantize = quantize
        self.phase = AutoPhase.WARMUP
        self.ratio = MEASURING_RATIO          # what the next step should run at
        self.measured: dict[float, float] = {}   # ratio -> measured step seconds (after warm-up)
        self.decisions: list[dict] = []
        self.reason = f"warm-up: measuring at swap_ratio {MEASURING_RATIO}"
        self.warning: Optional[str] = None    # set when the copies cannot hide at any ratio
        self.last_solve: Optional[StepAlphaResult] = None
        self._prediction: Optional[float] = None     # predicted step seconds at ``self.ratio``
        self._chosen: Optional[float] = None
        self._queue: list[float] = []
        self._recompute_per_token: Optional[float] = None

    @property
    def settled(self) -> bool:
        return self.phase is AutoPhase.SETTLED

    # --- measurements ------------------------------------------------------------------------
    def measured_step(self, times: StepTimes) -> MeasuredStep:
        """The program's inputs from one resolved step (NOTE [ Step timing ] in memo/swap/timing.py)."""
        ratio = times.ratio
        recomputed_tokens = self.tokens // self.seq * (self.seq - int(round(ratio * self.seq)))
        forward = statistics.median(times.forward_s[i] for i in self.swapped)
        if recomputed_tokens:
            self._recompute_per_token = (sum(times.recompute_s.get(i, 0.0) for i in self.swapped)
                                         / (len(self.swapped) * recomputed_tokens))
        per_token = self._recompute_per_token
        if per_token is None:   # nothing recomputed yet: a recompute is at most a forward
            per_token = forward / self.tokens
        return MeasuredStep(alpha=ratio, step_s=times.step_s, layer_forward_s=forward,
                            layer_backward_s=statistics.median(times.backward_s.get(i, 0.0) for i in self.swapped),
                            recompute_s_per_token=per_token, tokens=self.tokens,
                            d2h_bandwidth=_bandwidth(times.d2h_bytes, times.d2h_s),
                            h2d_bandwidth=_bandwidth(times.h2d_bytes, times.h2d_s))

    def _solve(self, m: MeasuredStep) -> StepAlphaResult:
        result = solve_step_alpha(m, s_fixed=self.s_fixed, s_other=self.s_other, swapped_layers=len(self.swapped),
                                  host_budget=self.host_budget)
        alpha = self.quantize(result.alpha)
        predicted = predict_step_s(alpha, m, s_fixed=self.s_fixed, s_other=self.s_other,
                                   swapped_layers=len(self.swapped))
        self.last_solve = result
        if not result.hidden:
            self.warning = (
                f"copying each layer's input and attention output ({self.s_fixed:.3g} B) takes "
                f"{self.s_fixed / m.d2h_bandwidth * 1e3:.1f} ms at {m.d2h_bandwidth / 1e9:.2f} GB/s, against a "
                f"layer forward of {m.layer_forward_s * 1e3:.1f} ms: the copies cannot hide behind compute. "
                f"memo recomputes every other activation (swap_ratio=0) and the remaining copies are exposed; "
                f"longer sequences, a larger keep_last_layers or a faster host link would hide them")
        return StepAlphaResult(**{**result.to_dict(), "alpha": alpha, "predicted_step_s": predicted})

    # --- the protocol ---------------------------------------------------------------------------
    def observe(self, times: StepTimes) -> None:
        """One resolved step; moves the protocol on and sets ``ratio`` for the next step."""
        if self.settled or times.step_s is None:
            return
        entry = {"phase": self.phase.value, "ratio": times.ratio, "step_s": times.step_s, "source": times.source,
                 "predicted_s": None}
        self.decisions.append(entry)
        if times.ratio != self.ratio:
            entry["decision"] = f"ran at {times.ratio}, not the {self.ratio} asked for (pool not grown yet): unused"
            return
        if self.phase is AutoPhase.WARMUP:
            self.phase = AutoPhase.MEASURE
            self._set(entry, self.ratio, "warm-up step: discarded")
            return
        self.measured[times.ratio] = times.step_s
        if self.phase is AutoPhase.MEASURE:
            m = self.measured_step(times)
            result = self._solve(m)
            self._chosen, self._prediction = result.alpha, result.predicted_step_s
            entry["solve"] = _solve_summary(m, result)
            self.phase = AutoPhase.STEADY
            self._set(entry, result.alpha, f"solved: {result.reason}; predicted step "
                                           f"{result.predicted_step_s:.4g} s at swap_ratio {result.alpha:.3f}")
        elif self.phase is AutoPhase.STEADY:
            entry["predicted_s"] = self._prediction
            error = abs(times.step_s - self._prediction) / times.step_s
            m = self.measured_step(times)
            result = self._solve(m)
            entry["solve"] = _solve_summary(m, result)
            if error <= TOLERANCE:
                self._settle(entry, result.alpha,
                             f"prediction within {error:.1%} of the measured {times.step_s:.4g} s; re-solved from "
                             f"this step: {result.reason}")
                return
            self._queue = self._neighbours(self._chosen, result.memory_bound)
            off_by = f"prediction {self._prediction:.4g} s vs measured {times.step_s:.4g} s ({error:.1%} off)"
            if not self._queue:
                self._settle_fastest(entry, off_by + "; no neighbour to measure")
                return
            self.phase = AutoPhase.NEIGHBOURS
            self._set(entry, self._queue.pop(0), off_by + f"; measuring neighbours of {self._chosen:.3f}")
        else:   # NEIGHBOURS
            if self._queue:
                self._set(entry, self._queue.pop(0), "neighbour measured")
            else:
                self._settle_fastest(entry, "neighbours measured")

    def _neighbours(self, chosen: float, memory_bound: float) -> list[float]:
        out = []
        for r in (chosen - NEIGHBOUR_STEP, chosen + NEIGHBOUR_STEP):
            r = self.quantize(min(max(r, 0.0), memory_bound))
            if r not in self.measured and r not in out:
                out.append(r)
        return out

    def _settle_fastest(self, entry: dict, why: str) -> None:
        best = min(self.measured, key=lambda r: (self.measured[r], -r))
        table = ", ".join(f"{r:.3f}: {s:.4g} s" for r, s in sorted(self.measured.items()))
        self._settle(entry, best, f"{why}; fastest measured ({table})")

    def _settle(self, entry: dict, ratio: float, why: str) -> None:
        self.phase = AutoPhase.SETTLED
        self._set(entry, ratio, why)

    def _set(self, entry: dict, ratio: float, why: str) -> None:
        self.ratio = ratio
        entry["decision"] = why
        entry["next_ratio"] = ratio
        self.reason = f"auto ({self.phase.value}): {why}; next swap_ratio {ratio:.3f}"


def _bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes/s of a copy stream; infinite when the copies took no measurable time."""
    return nbytes / seconds if seconds > 0 else float("inf")


def _solve_summary(m: MeasuredStep, result: StepAlphaResult) -> dict:
    return {"measured": {k: getattr(m, k) for k in m.__dataclass_fields__}, **result.to_dict()}
