"""Publication quality of every figure dgex draws (Figures 1-5, S2, S3), on synthetic inputs.

Checked on the files: no Type 3 font in any PDF (parsed, and with ``pdffonts`` where poppler is
installed), TrueType fonts embedded, PNGs of at least 300 dpi (the pHYs chunk).  Checked on the
matplotlib figures (captured as they are saved): no title starts with "Figure" (numbers belong to
captions), every axis is labelled and error axes carry their unit, the curves of one panel differ in
line style or marker (grey-scale) and in colour, legends cover no data, and Figure S3 counts each
landmark once and draws a map that is not blank when no weight passes k.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.container import BarContainer
from matplotlib.image import AxesImage

import dgex.evaluate
import dgex.figures
import dgex.interpret
from dgex.aggregate import aggregate
from dgex.figures import make_figures
from dgex.interpret import _figure_s2, interpret_s3, major_weights
from dgex.models import DGEX
from test_tables import make_grid

N_LANDMARKS, N_TARGETS, N_UNITS = 40, 30, 40  # sqrt(N_UNITS - 1) > 5: one outlier can pass k = 5


def _capture(monkeypatch, module, store: dict):
    """Wrap ``module.save_figure`` so every figure object is kept (by name) after it is written."""
    real = module.save_figure

    def keep(fig, out, name):
        store[name] = fig
        return real(fig, out, name)

    monkeypatch.setattr(module, "save_figure", keep)


def _write_s3_run(run_dir, part: int, rng, n_targets: int, planted: bool):
    """A finished 1-layer run folder (run.json + best_geo-va.pt) with known weights, no training needed.

    ``planted``: a few weights far out of their unit's distribution (major at k = 4), as the paper's
    hub units; otherwise uniform weights, of which none lies beyond 4 standard deviations.
    """
    run_dir.mkdir(parents=True)
    model = DGEX(N_LANDMARKS, n_targets, 1, N_UNITS, 0.1)
    w_in = rng.uniform(-1, 1, size=(N_UNITS, N_LANDMARKS))
    w_out = rng.uniform(-1, 1, size=(n_targets, N_UNITS))
    if planted:
        w_in[[2, 5], [3, 7]] = [40.0, -40.0]
        w_out[[1, 4, 6], [2, 2, 9]] = [40.0, 40.0, -40.0]
    with torch.no_grad():
        model.hidden[0].weight.copy_(torch.from_numpy(w_in))
        model.output.weight.copy_(torch.from_numpy(w_out))
    torch.save(
        {
            "state_dict": model.state_dict(),
            "config": {"layers": 1, "units": N_UNITS, "dropout": 0.1, "part": part},
            "shape": [N_LANDMARKS, n_targets, 1, N_UNITS],
            "genes": {
                "landmarks": [f"ENSG1{i:010d}" for i in range(N_LANDMARKS)],
                "targets": [f"ENSG2{part}{i:09d}" for i in range(n_targets)],
            },
        },
        run_dir / "best_geo-va.pt",
    )
    info = {
        "config": {"layers": 1, "units": N_UNITS, "dropout": 0.1, "part": part},
        "epochs": 1,
        "n_targets": n_targets,
        "best": {"geo-va": {"mae": 0.5, "epoch": 1}},
    }
    (run_dir / "run.json").write_text(json.dumps(info))
    return run_dir, w_in, w_out


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Every figure of figures/ and interpret/ drawn from synthetic results: ``{name: (figure, folder)}``."""
    root = tmp_path_factory.mktemp("quality")
    figs: dict = {}
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        _capture(mp, dgex.figures, figs)
        _capture(mp, dgex.interpret, figs)
        _capture(mp, dgex.evaluate, figs)
        dgex_dirs, base_dirs, _ = make_grid(root / "runs")
        aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=root / "agg")
        make_figures(aggregate=root / "agg", output_dir=root / "fig")
        for n in range(1, 6):
            out[f"figure{n}"] = root / "fig"
        rng = np.random.default_rng(0)
        runs, weights = [], []
        for part, n_targets in ((0, N_TARGETS), (1, N_TARGETS + 4)):
            r, w_in, w_out = _write_s3_run(root / "s3runs" / f"part{part}", part, rng, n_targets, planted=True)
            runs.append(r)
            weights.append((w_in, w_out))
        info = interpret_s3(runs=runs, output_dir=root / "s3", progress=False)
        out["figure_s3"] = root / "s3"
        s3 = {"info": info, "fig": figs["figure_s3"], "weights": weights}
        # S2 from a synthetic adjusted-R² table (its computation is tested in test_interpret.py)
        r2 = pd.DataFrame({"input": rng.uniform(0.2, 0.9, 200)})
        r2["hidden1"] = np.clip(r2["input"] + rng.normal(0.05, 0.05, 200), 0, 1)
        (root / "s2").mkdir()
        _figure_s2(r2, ["input", "hidden1"], "D-GEX-10%-25x1", "geo-tr", root / "s2")
        out["figure_s2"] = root / "s2"
        # a test set's scatter from synthetic per-gene errors (its scoring is tested in test_evaluate.py)
        lr = rng.uniform(0.3, 0.7, 300)
        panels = [
            {"selection": s, "model": "D-GEX-10% 2×40", "x": lr, "y": lr + rng.normal(0, 0.03, 300)}
            for s in ("geo-va", "1000g-va")
        ]
        (root / "ts").mkdir()
        dgex.evaluate.scatter_figure(panels, "demo", root / "ts", "test_set_demo_scatter")
        out["test_set_demo_scatter"] = root / "ts"
    return {"figs": figs, "dirs": out, "s3": s3, "root": root}


NAMES = ["figure1", "figure2", "figure3", "figure4", "figure5", "figure_s2", "figure_s3", "test_set_demo_scatter"]


# --------------------------------------------------------------------------- files
def _png_dpi(path) -> tuple[float, float]:
    """Horizontal and vertical resolution from the PNG's pHYs chunk (pixels per metre -> dpi)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"pHYs":
            x, y, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            assert unit == 1, f"{path}: pHYs unit is not the metre"
            return x * 0.0254, y * 0.0254
        pos += 12 + length
    raise AssertionError(f"{path}: no pHYs chunk, so no resolution is recorded")


@pytest.mark.parametrize("name", NAMES)
def test_png_is_at_least_300_dpi(drawn, name):
    png = drawn["dirs"][name] / f"{name}.png"
    dpi = _png_dpi(png)
    # 300 dpi is stored as 11811 pixels per metre, 299.9994 dpi
    assert min(round(d) for d in dpi) >= 300, f"{png}: {dpi} dpi"
    fig = drawn["figs"][name]
    width = struct.unpack(">I", png.read_bytes()[16:20])[0]
    assert width >= 0.5 * fig.get_figwidth() * 300, "the pixels are not there for 300 dpi"


@pytest.mark.parametrize("name", NAMES)
def test_pdf_embeds_truetype_fonts_and_no_type3(drawn, name):
    pdf = (drawn["dirs"][name] / f"{name}.pdf").read_bytes()
    assert pdf.startswith(b"%PDF")
    # font dictionaries are plain objects in matplotlib's PDFs; Type 3 glyphs would say so here
    assert not re.search(rb"/Subtype\s*/Type3", pdf), f"{name}.pdf has a Type 3 font"
    # Type 42 fonts are written as TrueType or, for Unicode text, as CID-keyed TrueType (CIDFontType2)
    assert re.search(rb"/Subtype\s*/(TrueType|CIDFontType2)", pdf), f"{name}.pdf declares no TrueType font"
    assert b"/FontFile2" in pdf, f"{name}.pdf does not embed its TrueType font program"
    assert b"/CreationDate" not in pdf, "a creation date makes every run's PDF differ"


@pytest.mark.parametrize("name", NAMES)
def test_pdffonts_reports_no_type3_font(drawn, name):
    if shutil.which("pdffonts") is None:
        pytest.skip("pdffonts (poppler-utils) is not installed; the PDF parse above checks the same")
    path = drawn["dirs"][name] / f"{name}.pdf"
    res = subprocess.run(["pdffonts", str(path)], capture_output=True, text=True, check=True)
    rows = res.stdout.splitlines()[2:]  # after the header and the dashes
    assert rows, f"pdffonts lists no font in {path}"
    for row in rows:
        assert "Type 3" not in row, row
        assert "TrueType" in row, row
        # columns ... emb sub uni object ID: the font program is embedded
        assert row.split()[-5] == "yes", row


# --------------------------------------------------------------------------- figure objects
def _axes(fig) -> list[Axes]:
    """Every visible axes of ``fig``, subfigures included."""
    return [a for a in fig.findobj(Axes) if a.get_visible() and a.axison]


def _titles(fig) -> list[str]:
    titles = [fig.get_suptitle()] + [s.get_suptitle() for s in fig.findobj(lambda o: hasattr(o, "subfigs"))]
    for ax in _axes(fig):
        titles += [ax.get_title(loc) for loc in ("left", "center", "right")]
    return [t for t in titles if t]


@pytest.mark.parametrize("name", NAMES)
def test_no_title_carries_the_figure_number(drawn, name):
    titles = _titles(drawn["figs"][name])
    assert titles, "the figure has no title at all"
    assert not [t for t in titles if t.lstrip().startswith("Figure")], titles


# a quantity with a unit must name it in its label: (word in the label, unit that must follow)
UNITS = [
    (re.compile(r"\bMAE\b|\berror\b"), "z-score units"),
    (re.compile(r"\bdensity\b"), "1 / z-score unit"),
    (re.compile(r"\bweight\b"), "standard deviations"),
]


@pytest.mark.parametrize("name", NAMES)
def test_every_axis_is_labelled_with_its_unit(drawn, name):
    for ax in _axes(drawn["figs"][name]):
        cbar = getattr(ax, "_colorbar", None)
        axes_to_check = [cbar.long_axis] if cbar is not None else [ax.xaxis, ax.yaxis]
        for axis in axes_to_check:
            label = axis.get_label_text()
            if name == "figure_s2" and not label and axis is ax.xaxis:
                assert [t.get_text() for t in axis.get_ticklabels()], "S2's box plot names its groups on ticks"
                continue
            assert label.strip(), f"{name}: unlabelled axis in the panel titled {ax.get_title()!r}"
            for pattern, unit in UNITS:
                if pattern.search(label):
                    assert unit in label, f"{name}: {label!r} lacks its unit ({unit})"


def _curves(ax):
    """The curves of a panel: labelled lines and any line of more than two points (no diagonals)."""
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_") or len(ln.get_xdata()) > 2]


# S2's panels hold a box plot and a scatter (no curves to tell apart); its lines are box outlines
@pytest.mark.parametrize("name", [n for n in NAMES if n != "figure_s2"])
def test_curves_of_a_panel_differ_in_style_and_colour(drawn, name):
    from matplotlib.colors import to_hex

    for ax in _axes(drawn["figs"][name]):
        curves = _curves(ax)
        # grey-scale: line style (with its dash pattern) or marker must tell every pair apart
        styles = [
            (ln.get_linestyle(), str(getattr(ln, "_unscaled_dash_pattern", "")), ln.get_marker()) for ln in curves
        ]
        assert len(set(styles)) == len(styles), f"{name}: curves share a style: {styles}"
        colours = [to_hex(ln.get_color()) for ln in curves]
        assert len(set(colours)) == len(colours), f"{name}: curves share a colour: {colours}"


def _data_points(ax, renderer) -> np.ndarray:
    """Display coordinates of the data drawn in ``ax``: line vertices (segments densely sampled),
    scatter points and bar tops."""
    pts = []
    for ln in ax.get_lines():
        xy = ln.get_transform().transform(np.column_stack([ln.get_xdata(), ln.get_ydata()]).astype(float))
        t = np.linspace(0, 1, 60)[:, None]
        for a, b in zip(xy[:-1], xy[1:]):
            pts.append(a + t * (b - a))
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and len(coll.get_offsets()):
            pts.append(coll.get_offset_transform().transform(coll.get_offsets()))
    for cont in ax.containers:
        if isinstance(cont, BarContainer):
            for p in cont.patches:
                e = p.get_window_extent(renderer)
                pts.append(np.array([[e.x0, e.y1], [e.x1, e.y1], [(e.x0 + e.x1) / 2, e.y1]]))
    return np.vstack(pts) if pts else np.empty((0, 2))


@pytest.mark.parametrize("name", NAMES)
def test_legends_cover_no_data(drawn, name):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = drawn["figs"][name]
    canvas = FigureCanvasAgg(fig)  # the saved figure is closed; draw it again to measure the layout
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = list(fig.findobj(lambda o: type(o).__name__ == "Legend"))
    for ax in _axes(fig):
        pts = _data_points(ax, renderer)
        for lg in legends:
            box = lg.get_window_extent(renderer)
            inside = (pts[:, 0] > box.x0) & (pts[:, 0] < box.x1) & (pts[:, 1] > box.y0) & (pts[:, 1] < box.y1)
            assert not inside.any(), f"{name}: a legend covers {int(inside.sum())} data points"


# --------------------------------------------------------------------------- S3 in particular
def test_s3_counts_each_landmark_once_over_the_parts(drawn):
    fig, info = drawn["s3"]["fig"], drawn["s3"]["info"]
    panels = [ax for ax in _axes(fig) if "landmark" in ax.get_ylabel() and ax.containers]
    assert panels, "no histogram of landmarks"
    for ax in panels:
        for cont in ax.containers:
            n = sum(p.get_height() for p in cont.patches)
            assert n == N_LANDMARKS, f"{cont.get_label()}: {n} landmarks counted, the networks have {N_LANDMARKS}"
    # an oracle for what the bars show: each landmark's major connections summed over both networks
    k = min(info["sigmas"])
    summed = sum(major_weights(w_in, k, axis=0).sum(axis=0) for w_in, _ in drawn["s3"]["weights"])
    cont = next(c for c in panels[0].containers if c.get_label() == f"k = {k:g}")
    heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in cont.patches}
    want = np.bincount(summed)
    assert {x: h for x, h in heights.items() if h} == {x: c for x, c in enumerate(want) if c}
    assert "each of the 40 landmarks counted once" in info["captions"]["figure_s3"]


def test_s3_map_marks_exactly_the_major_weights_with_their_sign(drawn):
    fig = drawn["s3"]["fig"]
    maps = [ax for ax in _axes(fig) if ax.images]
    assert len(maps) == 2
    w_in, w_out = drawn["s3"]["weights"][0]
    n_major = [int(major_weights(w_in, 4, axis=0).sum()), int(major_weights(w_out, 5, axis=1).sum())]
    for ax, want in zip(maps, n_major):
        img = ax.images[0].get_array()
        k = ax.images[0].norm.vmax
        marks = {}
        for coll in ax.collections:
            marker = coll.get_paths()[0].vertices
            sign = 1 if np.ptp(marker[:, 1]) > 0.1 else -1  # "+" has a vertical stroke, "_" has none
            marks[sign] = {tuple(xy) for xy in np.asarray(coll.get_offsets()).round().astype(int)}
        assert sum(len(v) for v in marks.values()) == want, ax.get_title()
        for sign, cells in marks.items():
            for x, y in cells:
                assert img[y, x] == sign * k, (sign, x, y, img[y, x])


def test_s3_map_is_not_blank_without_major_weights(tmp_path):
    """Weights of which none passes k: the map still shows the standardised weights, and marks none."""
    figs: dict = {}
    rng = np.random.default_rng(3)
    with pytest.MonkeyPatch.context() as mp:
        _capture(mp, dgex.interpret, figs)
        _capture(mp, dgex.evaluate, figs)
        run, w_in, _ = _write_s3_run(tmp_path / "part0", 0, rng, N_TARGETS, planted=False)
        assert not major_weights(w_in, 4, axis=0).any()  # uniform weights stay within sqrt(3) s.d.
        info = interpret_s3(runs=[run], output_dir=tmp_path / "s3", progress=False)
    assert "so the map marks none there" in info["captions"]["figure_s3"]
    for ax in [ax for ax in _axes(figs["figure_s3"]) if ax.images]:
        img = np.asarray(ax.images[0].get_array())
        assert img.std() > 0.1, "the map is blank"
        assert not [c for c in ax.collections if len(c.get_offsets())], "a mark without a major weight"
        assert isinstance(ax.images[0], AxesImage)
