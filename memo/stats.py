"""What memo did in the last step: per-layer bytes swapped, recomputed and kept, pool and timings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from memo.planner.units import format_bytes


@dataclass
class LayerStats:
    index: int
    kept: bool                 # one of the last keep_last_layers: nothing swapped
    activation_bytes: int = 0  # device bytes the layer's saved activations occupy during its forward
    swapped_bytes: int = 0     # bytes copied to the host pool
    recomputed_bytes: int = 0  # bytes dropped after the forward and recomputed before the backward
    resident_bytes: int = 0    # activation bytes still on the device after the forward pass
    forward_s: float = 0.0
    recompute_s: float = 0.0
    backward_s: float = 0.0    # swapped layers: from the restore to the last unpack, recompute excluded
    # "memo" (input + attention output + alpha of the rest on the host), "input" (only the input on the
    # host, attention recomputed) or "kept": NOTE [ Layer policies ] in memo/executor.py.
    policy: str = "memo"
    tile_tokens: Optional[int] = None   # tokens per MLP tile in the last forward; None: untiled


@dataclass
class MemoStats:
    layers: list[LayerStats]
    host_pool: dict
    swap_ratio: Optional[float]
    swap_ratio_setting: object
    swap_ratio_reason: str
    # Device bytes of the layer arguments every layer shares (masks, position ids, RoPE tables)
    # that memo keeps referenced for recomputation: once per model, never per layer.
    shared_bytes: int = 0
    # Last resolved step, seconds: step_s (first layer's forward to the end of the last swapped
    # layer's backward, waits for copies included), the sums of the layers' forward_s, backward_s
    # and recompute_s, and the copy streams' busy time (d2h_s, h2d_s). Measured on the streams that
    # did the work: see timing_source and NOTE [ Step timing ] in memo/swap/timing.py.
    step: dict = field(default_factory=dict)
    # Where the times came from: "cuda events" (device events) or "host clock" (the CPU).
    timing_source: Optional[str] = None
    # swap_ratio="auto": every measured step and what was decided from it (NOTE [ Auto swap ratio ]).
    swap_ratio_decisions: list = field(default_factory=list)
    # MemoConfig(planned_memory=True): the arena's hits, misses, fallback bytes, arena size and the
    # fallback pool's reserved/used bytes (NOTE [ Planned memory at run time ] rule 2); else empty.
    planned_memory: dict = field(default_factory=dict)
    # Bytes copied since this step began, by direction and path (memo.ops.copy_counters): token
    # slices by DMA or kernel (d2h/h2d_dma, d2h/h2d_kernel; host_pack/unpack on the CPU), records
    # swapped whole (d2h/h2d_whole) or in another dtype (d2h/h2d_convert).
    copies: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def swapped_bytes(self) -> int:
        return sum(layer.swapped_bytes for layer in self.layers)

    @property
    def recomputed_bytes(self) -> int:
        return sum(layer.recomputed_bytes for layer in self.layers)

    @property
    def resident_bytes(self) -> int:
        return sum(layer.resident_bytes for layer in self.layers)

    def __str__(self) -> str:
        ratio = "n/a" if self.swap_ratio is None else f"{self.swap_ratio:.3f}"
        lines = [f"memo: swap_ratio {ratio} ({self.swap_ratio_setting}); {self.swap_ratio_reason}",
                 f"{'layer':>5} {'policy':>6} {'tile':>6} {'activations':>12} {'swapped':>12} {'recomputed':>12} "
                 f"{'resident':>12} {'fwd s':>8} {'recomp s':>8}"]
        for s in self.layers:
            lines.append(f"{s.index:>5} {s.policy:>6} {s.tile_tokens or '-':>6} {format_bytes(s.activation_bytes):>12} "
                         f"{format_bytes(s.swapped_bytes):>12} {format_bytes(s.recomputed_bytes):>12} "
                         f"{format_bytes(s.resident_bytes):>12} {s.forward_s:>8.3f} {s.recompute_s:>8.3f}")
        pool = self.host_pool
        lines.append(f"host pool: reserved {format_bytes(pool.get('reserved_bytes', 0))}, high water "
                     f"{format_bytes(pool.get('high_water_bytes', 0))}, in use {format_bytes(pool.get('used_bytes', 0))}")
        lines.append(f"shared layer arguments kept once for recomputation: {format_bytes(self.shared_bytes)}")
        if any(self.copies.values()):
            lines.append("copies: " + ", ".join(f"{k.removesuffix('_bytes')} {format_bytes(v)}"
                                                for k, v in self.copies.items() if v))
        if self.step:
            lines.append("last step: " + ", ".join(f"{k} {v:.3f}" for k, v in self.step.items()))
        return "\n".join(lines)
