"""Stage ``figures``: the paper's Figures 1-5 from an aggregate folder (PNG + PDF each).

1. GEO-te error vs hidden units, one line per depth, at the dropout chosen on
   GEO-va, with the baselines as horizontal lines;
2. density of per-gene GEO-te MAE for LR, KNN-GE and the best D-GEX;
3. per-gene GEO-te MAE of the best D-GEX vs LR and vs KNN-GE;
4. as 3 on GTEx-te for the model selected by 1000G-va;
5. GTEx-te error vs epoch of the widest 2-layer network at each dropout rate.

Models are chosen on validation (:func:`dgex.tables.choose`), never fixed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregate import load_aggregate
from .errors import InputError
from .io import staged_files, write_json
from .plotting import MAE_UNIT, OKABE_ITO, pyplot, save_figure
from .tables import (
    BASELINES,
    TASKS,
    arch_name,
    baseline_rows,
    choose,
    chosen_arch,
    dgex_rows,
    fmt,
    gaps_note,
    incomplete_info,
    incomplete_points,
    pct,
)

log = logging.getLogger(__name__)

# each method keeps its colour and line style in every figure; baselines are dashed in their own patterns
COLORS = {
    "LR": OKABE_ITO["vermillion"],
    "LR-L1": OKABE_ITO["orange"],
    "LR-L2": OKABE_ITO["sky blue"],
    "KNN-GE": OKABE_ITO["black"],
    "D-GEX": OKABE_ITO["blue"],
}
DASHES = {"LR": (0, (6, 2)), "LR-L1": (0, (6, 2, 1, 2)), "LR-L2": (0, (2, 1.5)), "KNN-GE": (0, (8, 2, 1, 2, 1, 2))}
# D-GEX curves of one panel (depths, dropout rates): colour, line style and marker all differ
SERIES = [
    {"color": OKABE_ITO["blue"], "ls": "-", "marker": "o"},
    {"color": OKABE_ITO["bluish green"], "ls": (0, (1, 1.2)), "marker": "s"},
    {"color": OKABE_ITO["reddish purple"], "ls": (0, (5, 1.5, 1, 1.5)), "marker": "^"},
    {"color": OKABE_ITO["sky blue"], "ls": (0, (3, 1, 1, 1, 1, 1)), "marker": "D"},
]


def _outside_legend(fig, ax, ncols: int = 4) -> None:
    """Legend below the axes (needs a constrained-layout figure), never over the data."""
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=ncols, frameon=False)


def _genes(per_gene: pd.DataFrame, method: str, selected_by: str, split: str, arch=None) -> pd.Series:
    """Per-gene MAE of one model, indexed by gene id."""
    m = (per_gene["method"] == method) & (per_gene["selected_by"] == selected_by) & (per_gene["split"] == split)
    if arch is not None:
        m &= (per_gene["layers"] == arch[0]) & (per_gene["units"] == arch[1]) & (per_gene["dropout"] == arch[2])
    return per_gene[m].set_index("ensembl")["mae"]


def figure1(agg, out):
    """Figure 1: GEO-te overall error of each architecture at the dropout chosen on GEO-va, with the baselines; returns ``(files, caption)``."""
    plt = pyplot()
    summary = agg["summary"]
    pick = choose(summary, "geo")
    s = dgex_rows(summary, "geo-va", "geo-te")
    s = s[s["dropout"] == pick["dropout"]]
    base = baseline_rows(summary, "geo-va", "geo-te")
    fig, ax = plt.subplots(figsize=(6.2, 3.8), layout="constrained")
    for i, (layers, g) in enumerate(s.groupby("layers")):
        g = g.sort_values("units")
        st = SERIES[i % len(SERIES)]
        ax.plot(
            g["units"],
            g["mae_mean"],
            color=st["color"],
            ls=st["ls"],
            marker=st["marker"],
            label=f"D-GEX, {int(layers)} hidden layer{'s' * (layers > 1)}",
        )
    for m in BASELINES:
        b = base[base["method"] == m]
        if len(b):
            ax.axhline(b["mae_mean"].iloc[0], ls=DASHES[m], color=COLORS[m], lw=1.2, label=m)
    ax.set_xlabel("hidden units per layer")
    ax.set_ylabel(f"overall error on GEO-te\n(mean per-gene MAE, {MAE_UNIT})")
    ax.set_xticks(sorted(s["units"].unique()))
    ax.set_title(f"GEO-te error of {pct(pick['dropout'])} by architecture")
    _outside_legend(fig, ax, ncols=3)
    caption = (
        f"GEO-te overall error (mean per-gene MAE) of {pct(pick['dropout'])} (the dropout chosen "
        f"on GEO-va) for each depth and width; dashed lines: the baselines."
    )
    return save_figure(fig, out, "figure1"), caption


def figure2(agg, out):
    """Figure 2: density of the per-gene GEO-te MAE of LR, KNN-GE and the best D-GEX by GEO-va; returns ``(files, caption)``."""
    from scipy.stats import gaussian_kde

    plt = pyplot()
    arch = chosen_arch(agg["summary"], "geo")
    series = {
        "LR": _genes(agg["per_gene"], "LR", "geo-va", "geo-te"),
        "KNN-GE": _genes(agg["per_gene"], "KNN-GE", "geo-va", "geo-te"),
        arch_name(arch): _genes(agg["per_gene"], "D-GEX", "geo-va", "geo-te", arch),
    }
    series = {k: v for k, v in series.items() if len(v) > 1}
    lo = min(v.min() for v in series.values())
    hi = max(v.quantile(0.995) for v in series.values())
    grid = np.linspace(lo, hi, 400)
    fig, ax = plt.subplots(figsize=(6.2, 3.8), layout="constrained")
    styles = {"LR": DASHES["LR"], "KNN-GE": DASHES["KNN-GE"]}
    for name, v in series.items():
        color = COLORS.get(name, COLORS["D-GEX"])
        ax.plot(
            grid,
            gaussian_kde(v.to_numpy())(grid),
            color=color,
            ls=styles.get(name, "-"),
            lw=1.5 if name in styles else 2.0,
            label=f"{name}\n(mean {v.mean():.4f})",
        )
    ax.set_xlabel(f"per-gene MAE on GEO-te ({MAE_UNIT})")
    ax.set_ylabel(f"density of target genes\n(1 / {MAE_UNIT[:-1]})")
    ax.set_ylim(bottom=0)
    ax.set_title("Distribution of per-gene errors on GEO-te")
    _outside_legend(fig, ax)
    caption = f"Density of the per-gene GEO-te MAE of LR, KNN-GE and the best D-GEX by GEO-va ({arch_name(arch)})."
    return save_figure(fig, out, "figure2"), caption


def gene_scatter(ax, x, y, x_name: str, y_name: str) -> None:
    """Per-gene MAE of model ``y_name`` ``(n_genes,)`` against ``x_name``'s: points, diagonal, equal axes, units."""
    ax.scatter(x, y, s=4, alpha=0.4, linewidths=0, color=COLORS["D-GEX"], rasterized=True)
    pad = 0.02 * (max(x.max(), y.max()) - min(x.min(), y.min())) or 0.01  # 0.01: all errors equal
    lim = [min(x.min(), y.min()) - pad, max(x.max(), y.max()) + pad]
    ax.plot(lim, lim, color="black", lw=0.8)
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_aspect("equal")
    ax.set_xlabel(f"{x_name} per-gene MAE ({MAE_UNIT})")
    ax.set_ylabel(f"{y_name} per-gene MAE ({MAE_UNIT})")


def _scatter(agg, out, task: str, number: int):
    plt = pyplot()
    t = TASKS[task]
    arch = chosen_arch(agg["summary"], task)
    model = _genes(agg["per_gene"], "D-GEX", t["validation"], t["test"], arch)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.4), layout="constrained")
    wins = {}
    for ax, base_name, letter in zip(axes, ("LR", "KNN-GE"), "ab"):
        base = _genes(agg["per_gene"], base_name, t["validation"], t["test"])
        genes = model.index.intersection(base.index)
        if len(genes) == 0:
            ax.set_visible(False)
            continue
        x, y = base.loc[genes].to_numpy(), model.loc[genes].to_numpy()
        win = float(np.mean(y < x))
        wins[base_name] = win
        gene_scatter(ax, x, y, base_name, arch_name(arch))
        # the share of genes goes in the title, off the points
        ax.set_title(f"({letter}) vs {base_name}: D-GEX lower on {100 * win:.2f}% of genes\n(below the diagonal)")
    fig.suptitle(f"Per-gene errors on {t['title']} (models selected by {t['validation']})")
    caption = (
        f"Per-gene {t['title']} MAE of the best D-GEX by {t['validation']} ({arch_name(arch)}) against LR and "
        f"KNN-GE; below the diagonal D-GEX is better ("
        + ", ".join(f"{100 * w:.2f}% of genes vs {b}" for b, w in wins.items())
        + ")."
    )
    return save_figure(fig, out, f"figure{number}"), caption, wins


def figure5(agg, out):
    """Figure 5: GTEx-te overall error after each epoch at each dropout rate; ``(files, caption)``, or None without GTEx-te history."""
    plt = pyplot()
    hist = agg["history"]
    if "gtex-te" not in hist.columns or hist.empty:
        return None
    layers = 2 if (hist["layers"] == 2).any() else int(hist["layers"].max())
    units = int(hist[hist["layers"] == layers]["units"].max())
    h = hist[(hist["layers"] == layers) & (hist["units"] == units)]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(8.4, 3.6), layout="constrained")
    n_epochs = int(h["epoch"].max())
    first = max(1, n_epochs // 5)  # (b) leaves out the steep start, where the curves are far above their end
    for i, (d, g) in enumerate(h.groupby("dropout")):
        g = g.sort_values("epoch")
        st = SERIES[i % len(SERIES)]
        # markers at shifted epochs, so coinciding curves still show all their markers
        every = (i * max(1, n_epochs // 30), max(1, n_epochs // 10))
        kw = {"color": st["color"], "ls": st["ls"], "marker": st["marker"], "markersize": 4, "markevery": every}
        ax.plot(g["epoch"], g["gtex-te"], label=pct(float(d)), **kw)
        late = g[g["epoch"] >= first]
        zoom.plot(late["epoch"], late["gtex-te"], **{**kw, "markevery": (every[0], max(1, every[1] // 2))})
    lr = baseline_rows(agg["summary"], "1000g-va", "gtex-te")
    lr = lr[lr["method"] == "LR"]
    if len(lr):
        ax.axhline(lr["mae_mean"].iloc[0], ls=DASHES["LR"], color=COLORS["LR"], label="LR")
    for a in (ax, zoom):
        a.set_xlabel("training epoch")
        a.set_ylabel(f"overall error on GTEx-te\n(mean per-gene MAE, {MAE_UNIT})")
    ax.set_title(f"(a) {layers}×{units} network, all epochs")
    zoom.set_title(f"(b) epochs {first}–{n_epochs} enlarged, without LR")
    _outside_legend(fig, ax)
    # what the curves do is read off the data, never assumed (the paper saw the error rise late in training)
    trend = []
    for d, g in h.groupby("dropout"):
        e = g.sort_values("epoch")
        best = e.loc[e["gtex-te"].idxmin()]
        trend.append(
            f"{pct(float(d))} {fmt(e['gtex-te'].iloc[0])} at epoch {int(e['epoch'].iloc[0])}, lowest "
            f"{fmt(best['gtex-te'])} at epoch {int(best['epoch'])}, {fmt(e['gtex-te'].iloc[-1])} at the last"
        )
    caption = (
        f"GTEx-te overall error after each training epoch of the {layers}-layer {units}-unit network at each "
        f"dropout rate; dashed: LR"
        + (f" ({fmt(lr['mae_mean'].iloc[0])})" if len(lr) else "")
        + ". "
        + "; ".join(trend)
        + "."
    )
    return save_figure(fig, out, "figure5"), caption


def make_figures(*, aggregate, output_dir) -> dict:
    """Draw Figures 1-5 into ``output_dir``; returns the content of ``figures.json``."""
    agg = load_aggregate(aggregate)
    gaps = incomplete_points(agg, aggregate)
    out = Path(output_dir)
    if choose(agg["summary"], "geo") is None:
        raise InputError(f"{aggregate}: no D-GEX runs to draw; aggregate D-GEX runs first")
    with staged_files(out) as stage:  # all outputs or none
        figs = {}
        files, cap = figure1(agg, stage)
        figs["figure1"] = {"files": files, "caption": cap}
        files, cap = figure2(agg, stage)
        figs["figure2"] = {"files": files, "caption": cap}
        files, cap, wins = _scatter(agg, stage, "geo", 3)
        figs["figure3"] = {"files": files, "caption": cap, "dgex_wins": wins}
        if agg["info"].get("rnaseq") and chosen_arch(agg["summary"], "cross") is not None:
            files, cap, wins = _scatter(agg, stage, "cross", 4)
            figs["figure4"] = {"files": files, "caption": cap, "dgex_wins": wins}
            res = figure5(agg, stage)
            if res:
                figs["figure5"] = {"files": res[0], "caption": res[1]}
        skipped = [f"figure{n}" for n in (4, 5) if f"figure{n}" not in figs]
        if skipped:
            log.info("no RNA-seq results: skipped %s", ", ".join(skipped))
        info = {"figures": figs, "skipped": skipped}
        if gaps:  # every caption says what the aggregate lacks (a complete run's figures.json is unchanged)
            note = gaps_note(gaps).replace("† marks", "the tables mark")
            for fig in figs.values():
                fig["caption"] += " " + note
            info["incomplete"] = incomplete_info(gaps, note)
        write_json(stage / "figures.json", info)
    return info
