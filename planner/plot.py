"""PNG of a plan: each Level-1 layout (offset against op step, one rectangle per tensor) and the
step's planned memory over time. Torch-free; needs matplotlib."""

from __future__ import annotations

_KIND_COLOURS = {
    "layer_input": "#1f77b4", "attention_output": "#d62728", "lse": "#ff7f0e", "other": "#9aa7b8",
    "ring_buffer": "#9467bd", "grad_input": "#2ca02c", "model_state": "#8c564b", "block": "#7f7f7f",
    "swap_buffer": "#17becf", "kept": "#e377c2", "shared": "#bcbd22",
}


def _draw_layout(ax, layout: dict, title: str, gib: float) -> None:
    from matplotlib.patches import Rectangle
    seen = set()
    for t in layout["tensors"]:
        colour = _KIND_COLOURS.get(t.get("kind", "other"), "#9aa7b8")
        label = t.get("kind", "other") if t.get("kind", "other") not in seen else None
        seen.add(t.get("kind", "other"))
        ax.add_patch(Rectangle((t["start"], t["offset"] / gib), t["end"] - t["start"], t["bytes"] / gib,
                               facecolor=colour, edgecolor="black", linewidth=0.3, label=label))
    end = max((t["end"] for t in layout["tensors"]), default=1)
    ax.set_xlim(0, end)
    ax.set_ylim(0, max(layout["peak_bytes"] / gib * 1.05, 1e-9))
    ax.axhline(layout["peak_bytes"] / gib, color="black", linewidth=0.8, linestyle="--")
    ax.axhline(layout["lower_bound_bytes"] / gib, color="red", linewidth=0.8, linestyle=":")
    ax.set_title(f"{title}: peak {layout['peak_bytes'] / gib:.2f} GiB, lower bound "
                 f"{layout['lower_bound_bytes'] / gib:.2f} GiB", fontsize=9)
    ax.set_ylabel("offset (GiB)")
    ax.legend(fontsize=6, loc="upper left")


def plot_plan(plan: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = float(1 << 30)
    fig, axes = plt.subplots(3, 1, figsize=(11, 12))
    _draw_layout(axes[0], plan["layer"]["forward"], "layer forward (Level 1)", gib)
    axes[0].set_xlabel("op step")
    _draw_layout(axes[1], plan["layer"]["backward"], "layer backward (Level 1)", gib)
    axes[1].set_xlabel("op step")
    _draw_layout(axes[2], plan["step"], "training step (Level 2)", gib)
    labels = plan["step"].get("step_labels", [])
    if labels:
        ticks = list(range(0, len(labels), max(1, len(labels) // 12)))
        axes[2].set_xticks([t + 0.5 for t in ticks])
        axes[2].set_xticklabels([labels[t] for t in ticks], rotation=45, ha="right", fontsize=7)
    mem = plan["gpu"]["memory_bytes"] - plan.get("reserve_bytes", 0)
    axes[2].axhline(mem / gib, color="green", linewidth=1.0, label="GPU memory - reserve")
    axes[2].set_ylim(0, max(plan["step"]["peak_bytes"], mem) / gib * 1.05)
    fig.suptitle(f"memo plan: {plan.get('model_name') or plan['model']['model_type']}, {plan['seq_len']:,} tokens, "
                 f"SP {plan['sp']}, {plan['gpus']} x {plan['gpu']['name']}, ZeRO {plan['zero_stage']}, "
                 f"alpha {plan['alpha']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
