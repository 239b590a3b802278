"""PNG plots of a comparison and of a sweep (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: CI machines and servers have no display

import matplotlib.pyplot as plt  # noqa: E402

MIB = 2**20
DPI = 100
# Memory components of the live-tensor accounting, grouped into the four bars' segments.
MEMORY_SEGMENTS: dict[str, tuple[str, ...]] = {
    "weights": ("weights",),
    "gradients": ("gradients",),
    "optimizer states": ("optimizer_states", "projection", "accumulation_buffers"),
    "other (activations, logits,\ntemporaries, batch)": ("activations", "temporaries", "inputs"),
}
_STYLES = ["-", "--", "-.", ":"]


def _style(index: int) -> dict[str, Any]:
    # Curves that coincide (galore, galore-torch) stay visible: colours and dashes both vary.
    return {"color": f"C{index % 10}", "linestyle": _STYLES[index % len(_STYLES)]}


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def loss_curves(
    results: dict[str, dict[str, Any]], title: str, path: Path, *, wall_time: bool
) -> Path:
    """Train loss per step against the step, or against the method's own cumulative seconds."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for index, (label, r) in enumerate(results.items()):
        losses = r["losses"]
        x = (
            list(itertools.accumulate(r["step_seconds"]))
            if wall_time
            else range(1, len(losses) + 1)
        )
        ax.plot(list(x), losses, label=label, linewidth=1.3, **_style(index))
    ax.set_xlabel("training wall time of the method (s)" if wall_time else "optimizer step")
    ax.set_ylabel("train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def memory_bars(results: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    """Stacked bars of the live bytes at each method's measured peak, by component (MiB)."""
    labels = [k for k, r in results.items() if r.get("memory")]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    bottoms = [0.0] * len(labels)
    for index, (segment, components) in enumerate(MEMORY_SEGMENTS.items()):
        heights = [
            sum(results[k]["memory"]["breakdown"].get(c, 0) for c in components) / MIB
            for k in labels
        ]
        ax.bar(labels, heights, bottom=bottoms, label=segment, color=f"C{index}")
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_ylabel("live tensor memory at the step's peak (MiB)")
    ax.set_xlabel("method")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    # Outside the axes: the stacks reach the top, a legend inside would cover them.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def cuda_memory_bars(results: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    """One bar per method: its peak GPU memory (``torch.cuda.max_memory_allocated``, MiB)."""
    labels = [k for k, r in results.items() if r.get("memory")]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.bar(labels, [results[k]["memory"]["peak_bytes"] / MIB for k in labels], color="C0")
    ax.set_ylabel("peak GPU memory allocated (MiB)")
    ax.set_xlabel("method")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def sweep_plot(
    points: dict[str, list[tuple[int, float]]], setting: str, title: str, path: Path
) -> Path:
    """Final train loss against the swept setting, one line per method (log2 x axis)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for index, (method, values) in enumerate(points.items()):
        xs, ys = zip(*sorted(values)) if values else ((), ())
        ax.plot(xs, ys, marker="o", label=method, **_style(index))
    ax.set_xscale("log", base=2)
    all_x = sorted({x for values in points.values() for x, _ in values})
    ax.set_xticks(all_x, [str(x) for x in all_x])
    ax.set_xlabel(setting)
    ax.set_ylabel("final train loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
