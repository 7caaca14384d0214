"""Matplotlib set-up shared by every figure dgex draws (headless, readable fonts, atomic PNG + PDF)."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed on clusters) with the project's font sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9})
    return plt


def save_figure(fig, out: Path, name: str) -> list[str]:
    """Write ``out/name.png`` and ``out/name.pdf`` atomically, close the figure; returns the file names."""
    files = []
    for ext in ("png", "pdf"):
        with atomic_path(Path(out) / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        files.append(f"{name}.{ext}")
    pyplot().close(fig)
    return files
