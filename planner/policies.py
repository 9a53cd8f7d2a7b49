"""Layer policies: which layers run "memo", "input" or "kept", and the swap ratio of the "memo" ones. Torch-free.

NOTE [ Policy choice ]
  The runtime's policies: NOTE [ Layer policies ] in memo/executor.py; the cost of each:
  NOTE [ Step-time model ] rules 3, 4, 7 and 8 in cost.py; their device blocks: NOTE [ Level-2
  step timeline ] in plan.py.
  1. A mix is (keep, inputs, alpha): the last ``keep`` layers are "kept", the first ``inputs``
     layers run "input" (the runtime puts them first: memo.runtime ``_choose_policies``), the
     rest run "memo" at swap ratio alpha. ``Mix.policies()`` is the plan's ``layer_policies``.
  2. Host bytes per rank: ``inputs * S_in + memos * (S_in + S_attn + alpha * S_other)``, plus the
     offloaded optimizer states. ``S_*`` come from the layer profiled as the runtime runs it
     (tiled: NOTE [ Profiler allocation steps ] rule 6 in memo/profile.py).
  3. alpha: the paper's program (``solve_alpha``) for the "memo" layers, with the host left after
     the "input" layers' inputs; a given ``--swap-ratio`` is used as given.
  4. Device: the Level-2 lower bound of the mix (the largest total of simultaneously live bytes;
     no layout is lower), from the Level-1 arenas and the per-policy blocks.
  5. The choice: every keep in ``0..max_keep`` (or the one given) and every inputs in
     ``0..n - keep``; a mix fits when its host bytes fit the rank's share of the node's host memory
     and its device bound fits the GPU. Among the mixes that fit, the least predicted step time;
     ties (within 1e-9 relative) go to fewer "input" layers, then fewer kept layers (less device
     memory). Few enough mixes (a few hundred) to enumerate in milliseconds.
  6. When no mix fits, the one that comes closest: the least device bound among the mixes whose
     host bytes fit (so the report names the device as the limit), else every layer "input" with
     the most kept layers the device allows (so it names the host).
  7. The least host memory the job needs (``least_host_bytes``): the least host bytes of a mix
     that fits the device, with "memo" layers at alpha 0; slower than the chosen mix, which fills
     the budget with swapped tokens (alpha) to recompute less.
  8. ``--policy memo`` / ``--policy input`` (``Options.policy``) give every swapped layer that policy
     (keep and alpha are still chosen): a run without a plan and with a fixed swap ratio runs
     "memo" everywhere (NOTE [ Layer policies ] rule 2), so that is the plan to compare it with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

from .alpha import solve_alpha

POLICIES = ("memo", "input", "kept")
SWAPPED_CHOICES = ("auto", "memo", "input")   # --policy: chosen per mix, or one policy for every swapped layer
MAX_KEEP = 4          # kept layers the planner tries (the paper keeps 2)
_TIE = 1e-9


@dataclass(frozen=True)
class LayerSizes:
    """One rank's bytes of one layer. See NOTE [ Policy choice ] rule 2."""

    s_in: int            # layer input
    s_attn: int          # attention output + LSE
    s_other: int         # every other saved token tensor

    @property
    def kept(self) -> int:
        return self.s_in + self.s_attn + self.s_other

    def memo_host(self, alpha: float) -> float:
        return self.s_in + self.s_attn + alpha * self.s_other


@dataclass(frozen=True)
class Mix:
    n: int
    keep: int
    inputs: int
    alpha: float

    @property
    def memos(self) -> int:
        return self.n - self.keep - self.inputs

    def policies(self) -> list[str]:
        return ["input"] * self.inputs + ["memo"] * self.memos + ["kept"] * self.keep

    def host_bytes(self, sizes: LayerSizes) -> float:
        """Activation bytes on the host, one rank (rule 2)."""
        return self.inputs * sizes.s_in + self.memos * sizes.memo_host(self.alpha)

    def to_dict(self) -> dict:
        return {**asdict(self), "memos": self.memos}


def policies_of(keep: int, inputs: int, n: int) -> list[str]:
    return Mix(n, keep, inputs, 0.0).policies()


def mix_alpha(sizes: LayerSizes, *, n: int, keep: int, inputs: int, host_budget: float, bandwidth: float,
              t_fwd: float, given: Optional[float] = None) -> dict:
    """Alpha of the "memo" layers of a mix (rule 3), as ``AlphaResult.to_dict()`` plus ``fits``
    for the whole mix's host bytes."""
    memos = n - keep - inputs
    left = host_budget - inputs * sizes.s_in
    res = solve_alpha(s_in=sizes.s_in, s_attn=sizes.s_attn, s_other=sizes.s_other, bandwidth=bandwidth,
                      t_fwd=t_fwd, n_layers=memos, keep_layers=0, host_budget=max(left, 0.0)).to_dict()
    if left < 0:
        res["fits"] = False
        res["reason"] = (f"host budget {host_budget:.3g} B cannot hold the inputs of the {inputs} \"input\" layers "
                         f"({inputs * sizes.s_in:.3g} B)")
    if given is not None:
        res["alpha"] = float(given)
        res["reason"] = f"given: alpha = {given:.3f}"
        res["fits"] = Mix(n, keep, inputs, given).host_bytes(sizes) <= host_budget
        res["hidden"] = sizes.memo_host(given) / bandwidth <= t_fwd
    return res


@dataclass
class Candidate:
    mix: Mix
    alpha_detail: dict
    host_bytes: float         # per rank, activations only
    device_bound: int         # Level-2 lower bound + reserve
    step_s: float
    host_fits: bool
    device_fits: bool

    @property
    def fits(self) -> bool:
        return self.host_fits and self.device_fits

    def summary(self) -> dict:
        return {"keep": self.mix.keep, "inputs": self.mix.inputs, "memos": self.mix.memos,
                "alpha": self.mix.alpha, "host_bytes_per_rank": int(self.host_bytes),
                "device_bound_bytes": int(self.device_bound), "step_time_s": self.step_s, "fits": self.fits}


def enumerate_mixes(sizes: LayerSizes, *, n: int, host_budget: float, device_memory: int, bandwidth: float,
                    t_fwd: float, device_bound: Callable[[Mix], int], step_s: Callable[[Mix], float],
                    keep: Optional[int] = None, max_keep: int = MAX_KEEP, alpha: Optional[float] = None,
                    policy: str = "auto") -> list[Candidate]:
    """Every mix of rule 5 with its host bytes, device bound and step time (``device_bound`` and
    ``step_s`` are the caller's models of one mix). ``policy`` "memo" or "input" makes every
    swapped layer run that policy (rule 8)."""
    if policy not in SWAPPED_CHOICES:
        raise ValueError(f"memo.plan: layer policy {policy!r} is not one of {', '.join(SWAPPED_CHOICES)}")
    keeps = [min(keep, n)] if keep is not None else list(range(0, min(max_keep, n) + 1))
    out = []
    for k in keeps:
        counts = {"auto": range(0, n - k + 1), "memo": (0,), "input": (n - k,)}[policy]
        for inputs in counts:
            ad = mix_alpha(sizes, n=n, keep=k, inputs=inputs, host_budget=host_budget, bandwidth=bandwidth,
                           t_fwd=t_fwd, given=alpha)
            mix = Mix(n, k, inputs, ad["alpha"])
            host = mix.host_bytes(sizes)
            host_fits = host <= host_budget * (1 + 1e-12) and host_budget >= 0
            # Rule 6 needs the device bound of mixes the host holds, and of the all-"input" ones.
            dev = device_bound(mix) if host_fits or mix.memos == 0 else device_memory + 1
            out.append(Candidate(mix, ad, host, dev, step_s(mix), host_fits, dev <= device_memory))
    return out


def _order(c: Candidate) -> tuple:
    return (c.step_s, c.mix.inputs, c.mix.keep)


def choose(cands: list[Candidate]) -> tuple[Candidate, list[Candidate]]:
    """The chosen candidate (rules 5 and 6) and the fitting ones, fastest first."""
    fitting = [c for c in cands if c.fits]
    if fitting:
        best_s = min(c.step_s for c in fitting)
        fitting.sort(key=lambda c: (c.step_s > best_s * (1 + _TIE), c.step_s, c.mix.inputs, c.mix.keep))
        return fitting[0], fitting
    host_ok = [c for c in cands if c.host_fits]
    if host_ok:
        return min(host_ok, key=lambda c: (c.device_bound, _order(c))), []
    all_input = [c for c in cands if c.mix.memos == 0 and c.device_fits] or [c for c in cands if c.mix.memos == 0]
    return min(all_input or cands, key=lambda c: (c.host_bytes, _order(c))), []


def least_host(cands: list[Candidate], sizes: LayerSizes) -> Optional[tuple[Mix, float]]:
    """Rule 7: the mix (alpha 0) with the least host bytes whose device bound fits, and those bytes."""
    best = None
    for c in cands:
        if not c.device_fits:
            continue
        m = Mix(c.mix.n, c.mix.keep, c.mix.inputs, 0.0)
        host = m.host_bytes(sizes)
        if best is None or host < best[1]:
            best = (m, host)
    return best
