"""Heatmap of expert scores (layers x experts) with the selected experts marked.

Needs matplotlib, the optional extra ``plot``: ``pip install 'esft-rs[plot]'``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from esft_rs.errors import EsftError
from esft_rs.files.outputs import PLOT_MARK, staged

if TYPE_CHECKING:
    from esft_rs.routing.selection import Selection

MISSING = "plotting needs matplotlib: pip install 'esft-rs[plot]'"


def require_matplotlib() -> None:
    """Raises ImportError with an install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(MISSING) from None


def check_plot_path(path: str | os.PathLike[str]) -> None:
    """Refuses a path whose suffix names no format matplotlib writes (before any work)."""
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if suffix not in kinds:
        what = f"extension .{suffix}" if suffix else "no extension"
        raise EsftError(
            f"{os.fspath(path)}: {what}; a plot needs one of ." + ", .".join(sorted(kinds))
        )


def heatmap(selection: Selection, path: str | os.PathLike[str], *, format: str | None = None,
            task: str | None = None) -> None:
    """Writes the score heatmap of ``selection`` to ``path`` (``format``: png, pdf, svg...;
    default: from the suffix), the selected experts circled (a legend says so); ``task``
    names the task in the title."""
    if format is None:
        check_plot_path(path)
    else:
        require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats, values = selection.stats, selection.scores
    size = (max(6.0, stats.num_experts * 0.14), max(3.0, stats.num_layers * 0.25))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(np.nan_to_num(values), aspect="auto", cmap="viridis", interpolation="nearest")
    rows = {layer: r for r, layer in enumerate(stats.layers)}
    xs = [e for layer, ids in selection.experts.items() for e in ids]
    ys = [rows[layer] for layer, ids in selection.experts.items() for _ in ids]
    ax.scatter(xs, ys, s=8, facecolors="none", edgecolors="red", linewidths=0.8, label="selected")
    ax.set_yticks(range(stats.num_layers), [str(x) for x in stats.layers], fontsize=6)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    title = f"{selection.score} scores, top-p {selection.top_p}"
    ax.set_title(f"{task}: {title}" if task else title, loc="left", fontsize=9)
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False,
              borderaxespad=0.2)
    fig.colorbar(image, ax=ax, label=f"{selection.score} score")
    fig.tight_layout()
    save_figure(fig, path, format)
    plt.close(fig)


def _marked(fmt: str | None) -> dict[str, Any]:
    """The mark by which a later esft-rs run knows this plot as its own (``outputs``)."""
    key = {"png": "Software", "pdf": "Creator", "svg": "Creator"}.get(fmt or "png")
    return {"metadata": {key: PLOT_MARK.decode()}} if key else {}


def save_figure(fig: Any, path: str | os.PathLike[str], format: str | None = None) -> None:
    """``fig.savefig`` into ``path`` (format from its suffix by default), whole or not at all."""
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    fmt = format or suffix or None
    with staged(path) as tmp, open(tmp, "wb") as f:
        fig.savefig(f, dpi=150, format=fmt, **_marked(fmt))
