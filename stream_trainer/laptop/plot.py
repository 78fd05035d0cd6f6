"""The demo's learning curve: prequential metric over records learnt, as a PNG.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch,
no display needed). matplotlib is imported only when a curve is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CurvePoint:
    """One observation of the running service: records learnt and the metric then."""

    records_learnt: float
    window: float | None
    total: float | None


def plot_learning_curve(
    path: Path,
    points: Sequence[CurvePoint],
    metric: str,
    *,
    drifts: Sequence[float] = (),
    versions: Sequence[tuple[int, float]] = (),
    title: str = "",
    window_size: int | None = None,
) -> Path:
    """Write the curve to ``path`` (PNG) and return it.

    ``drifts`` are records-learnt positions of drift detections (red dashed lines);
    ``versions`` are ``(version, records_learnt)`` of published versions (green dotted
    lines, labelled ``vN``). Points without a value are skipped; an empty series still
    produces a valid (empty) chart so a very short run never fails here.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(9, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    window_label = f"rolling window ({window_size} records)" if window_size else "rolling window"
    for attribute, label, style in (("window", window_label, "-"), ("total", "since start", "--")):
        xs = [p.records_learnt for p in points if getattr(p, attribute) is not None]
        ys = [getattr(p, attribute) for p in points if getattr(p, attribute) is not None]
        if xs:
            axes.plot(xs, ys, style, linewidth=1.6, label=f"{metric}, {label}")
    for i, position in enumerate(drifts):
        axes.axvline(
            position,
            color="tab:red",
            linestyle="--",
            linewidth=1.0,
            label="drift detected" if i == 0 else None,
        )
    for i, (version, position) in enumerate(versions):
        axes.axvline(
            position,
            color="tab:green",
            linestyle=":",
            linewidth=1.2,
            label="version published" if i == 0 else None,
        )
        # Label at the top edge, in axes coordinates vertically, so it never hides data.
        axes.text(
            position,
            1.01,
            f"v{version}",
            color="tab:green",
            fontsize=8,
            ha="center",
            va="bottom",
            transform=axes.get_xaxis_transform(),
        )
    axes.set_xlabel("records learnt")
    axes.set_ylabel(f"prequential {metric}")
    axes.set_xlim(left=0)
    if title:
        axes.set_title(title, pad=16)
    axes.grid(True, alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(str(path), format="png")
    return path
