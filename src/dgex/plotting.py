"""Matplotlib set-up shared by every figure dgex draws (headless, publication output, atomic PNG + PDF).

Every figure is written as a vector PDF with embedded TrueType fonts (no Type 3
fonts, which journals' checks reject) and a 300 dpi PNG.  Curves of one panel
differ in colour (the Okabe-Ito palette, readable with every common colour-vision
deficiency) *and* in line style or marker, so they stay apart in grey-scale.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_path

DPI = 300

# Okabe & Ito (2008), "Color Universal Design": distinguishable for deuteranopes, protanopes and tritanopes
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "bluish green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish purple": "#CC79A7",
}

# errors are computed on expression standardised per gene, so an MAE is in units of that gene's s.d.
MAE_UNIT = "z-score units"

RC = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "pdf.fonttype": 42,  # TrueType (Type 42) instead of Type 3 glyph procedures
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "savefig.dpi": DPI,
    "figure.dpi": 100,
    "lines.linewidth": 1.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed on clusters) with the project's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(RC)
    return plt


def save_figure(fig, out: Path, name: str) -> list[str]:
    """Write ``out/name.png`` (300 dpi) and ``out/name.pdf`` atomically, close the figure; returns the file names."""
    files = []
    for ext in ("png", "pdf"):
        # no creation date in the PDF, so the same results give the same bytes
        meta = {"CreationDate": None} if ext == "pdf" else None
        with atomic_path(Path(out) / f"{name}.{ext}") as tmp:
            fig.savefig(tmp, format=ext, dpi=DPI, bbox_inches="tight", pad_inches=0.05, metadata=meta)
        files.append(f"{name}.{ext}")
    pyplot().close(fig)
    return files
