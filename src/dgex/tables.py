"""Stage ``tables``: the paper's Tables 1-2, supplementary S2-S5 and a statistics table.

Everything shown is chosen on validation, as in the paper: the GEO task uses
models selected by GEO-va and shows the dropout rate whose best architecture
has the lowest GEO-va error (the paper's answer: 10%); the cross-platform task
uses models selected by 1000G-va and the dropout chosen by 1000G-va (the
paper's: 25%).  Each table is written as ``<name>.csv`` (numbers) and
``<name>.md`` (formatted like the paper: ``.3421 ± .0912``).

Every mean compares like with like only if each row covers the same genes: a
summary whose rows cover different numbers of genes on one evaluation is
refused, unless ``dgex aggregate --allow-incomplete`` declared the incomplete
grid points; then every table marks them (†, ``n_genes`` and ``incomplete``
columns), says what is missing, and chooses models among the grid points that
cover the most genes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .aggregate import describe_gap, load_aggregate
from .errors import InputError
from .io import atomic_path, staged_files, write_json, write_text
from .metrics import bootstrap_ci, compare
from .settings import TablesSettings

log = logging.getLogger(__name__)

BASELINES = ("LR", "LR-L1", "LR-L2", "KNN-GE")

#: The two tasks: (selection split, test split, paper table).
TASKS = {
    "geo": {"validation": "geo-va", "test": "geo-te", "table": "table1", "title": "GEO-te"},
    "cross": {"validation": "1000g-va", "test": "gtex-te", "table": "table2", "title": "GTEx-te"},
}


def _published(dropout: float, by_units: dict, baselines: tuple) -> dict:
    """One paper table as ``{"dropout": rate, (layers, units): MAE, baseline name: MAE}``.

    ``by_units`` maps a width to the MAEs of 1, 2 and 3 hidden layers;
    ``baselines`` are the MAEs of :data:`BASELINES`, in that order.
    """
    table = {"dropout": dropout}
    table.update({(layers, units): mae for units, row in by_units.items() for layers, mae in enumerate(row, 1)})
    table.update(zip(BASELINES, baselines, strict=True))
    return table


#: Published overall MAEs (Chen et al. 2016): Table 1 (GEO-te, D-GEX-10%) and
#: Table 2 (GTEx-te, D-GEX-25%); keys are (layers, units) or a baseline name.
PAPER = {
    "geo": _published(
        0.10,
        # units: MAE with 1, 2, 3 hidden layers
        {3000: (0.3421, 0.3377, 0.3362), 6000: (0.3337, 0.3280, 0.3252), 9000: (0.3300, 0.3224, 0.3204)},
        (0.3784, 0.3782, 0.3784, 0.5866),  # LR, LR-L1, LR-L2, KNN-GE
    ),
    "cross": _published(
        0.25,
        {3000: (0.4507, 0.4586, 0.5160), 6000: (0.4428, 0.4446, 0.4595), 9000: (0.4394, 0.4393, 0.4492)},
        (0.4702, 0.5667, 0.4702, 0.6520),
    ),
}

#: Supplementary tables: all dropout rates on one split, with the models selected by...
SUPPLEMENT = {
    "tableS2": ("geo-va", "geo-va"),
    "tableS3": ("geo-te", "geo-va"),
    "tableS4": ("1000g-va", "1000g-va"),
    "tableS5": ("gtex-te", "1000g-va"),
}


def fmt(mean: float, std: float | None = None) -> str:
    """``.3421 ± .0912`` (the paper's style); '–' for missing values."""

    def one(v):
        if v is None or not np.isfinite(v):
            return "–"
        s = f"{v:.4f}"
        return s[1:] if s.startswith("0.") else ("-" + s[2:] if s.startswith("-0.") else s)

    return one(mean) if std is None else f"{one(mean)} ± {one(std)}"


def pct(d: float) -> str:
    """The paper's name for D-GEX at dropout rate ``d``, e.g. ``D-GEX-10%``."""
    return f"D-GEX-{100 * d:g}%"


def dgex_rows(summary: pd.DataFrame, selected_by: str, split: str) -> pd.DataFrame:
    """The D-GEX rows of ``summary`` for models selected by ``selected_by``, evaluated on ``split``."""
    s = summary[(summary["method"] == "D-GEX") & (summary["selected_by"] == selected_by) & (summary["split"] == split)]
    return s.astype({"layers": int, "units": int})


def _baseline_row(r: pd.Series) -> dict:
    """A baseline's row of a table: its method and MAE (mean, std); it has no architecture or dropout."""
    return {
        "method": r["method"],
        "layers": None,
        "units": None,
        "dropout": None,
        "mae_mean": r["mae_mean"],
        "mae_std": r["mae_std"],
    }


def baseline_rows(summary: pd.DataFrame, selected_by: str, split: str) -> pd.DataFrame:
    """The baseline rows of ``summary`` tuned on ``selected_by``, evaluated on ``split``."""
    return summary[
        summary["method"].isin(BASELINES) & (summary["selected_by"] == selected_by) & (summary["split"] == split)
    ]


def choose(summary: pd.DataFrame, task: str) -> dict | None:
    """The dropout and architecture a task shows: lowest validation MAE (None without D-GEX runs)."""
    t = TASKS[task]
    val = dgex_rows(summary, t["validation"], t["validation"])
    if val.empty:
        return None
    val = val[val["n_genes"] == val["n_genes"].max()]  # an incomplete grid point's mean is over fewer genes
    best_per_dropout = val.groupby("dropout")["mae_mean"].min()
    dropout = float(best_per_dropout.idxmin())
    at = val[val["dropout"] == dropout].sort_values("mae_mean").iloc[0]
    return {
        "dropout": dropout,
        "layers": int(at["layers"]),
        "units": int(at["units"]),
        "validation_mae": float(at["mae_mean"]),
        "validation_by_dropout": {f"{d:g}": float(v) for d, v in best_per_dropout.items()},
    }


def chosen_arch(summary: pd.DataFrame, task: str) -> tuple | None:
    """``(layers, units, dropout)`` of the network a task shows (:func:`choose`), None without D-GEX runs."""
    pick = choose(summary, task)
    return None if pick is None else (pick["layers"], pick["units"], pick["dropout"])


def arch_name(arch) -> str:
    """``D-GEX-10% 3×9000`` for ``(layers, units, dropout)``."""
    return f"{pct(arch[2])} {arch[0]}×{arch[1]}"


def incomplete_points(agg: dict, source) -> list[dict]:
    """The incomplete grid points an aggregate declares, and the unfinished run folders it skipped.

    Those are ``aggregate.json``'s ``incomplete`` entries plus one
    ``{"left_out": dir}`` per entry of its ``left_out``.
    Refuses a summary whose rows cover different numbers of genes on one
    evaluation (selection x split) when the aggregate declares no gaps.
    """
    gaps = agg["info"].get("incomplete") or []
    left_out = agg["info"].get("left_out") or []
    if left_out:  # unfinished run folders were skipped: whatever they held is missing, too
        gaps = gaps + [{"left_out": d} for d in left_out]
    counts = agg["summary"].groupby(["selected_by", "split"])["n_genes"].agg(["min", "max"])
    uneven = counts[counts["min"] != counts["max"]]
    if len(uneven) and not gaps:
        (sel, split), row = next(iter(uneven.iterrows()))
        raise InputError(
            f"{source}/summary.csv: its rows cover between {int(row['min'])} and {int(row['max'])} genes on {split} "
            f"(selected by {sel}) but aggregate.json declares no incomplete grid point, so their means are not "
            f"comparable; rerun `dgex aggregate` (it names the missing target parts), or aggregate with "
            f"--allow-incomplete so that the tables state the gaps"
        )
    return gaps


def gaps_note(gaps: list[dict]) -> str:
    """What an incomplete aggregate lacks, for every table and caption ('' when complete)."""
    if not gaps:
        return ""
    points = [g for g in gaps if "left_out" not in g]
    left_out = [g["left_out"] for g in gaps if "left_out" in g]
    note = "**Incomplete** (aggregated with --allow-incomplete):"
    if points:
        note += (
            f" † marks {len(points)} grid point{'s' * (len(points) > 1)} without all target parts: "
            f"{'; '.join(describe_gap(g) for g in points)}. Their errors are means over fewer genes than the other "
            f"rows' (n_genes in the CSV) and are not comparable; dropout and architecture are chosen among the "
            f"grid points that cover the most genes."
        )
    if left_out:
        note += f" Unfinished run folders left out: {', '.join(left_out)}."
    return note


def incomplete_info(gaps: list[dict], note: str) -> dict:
    """What tables.json / figures.json record of an incomplete aggregate."""
    return {
        "grid_points": [g for g in gaps if "left_out" not in g],
        "left_out": [g["left_out"] for g in gaps if "left_out" in g],
        "note": note,
    }


def _dagger(r, incomplete) -> str:
    return " †" if (int(r["layers"]), int(r["units"]), float(r["dropout"])) in incomplete else ""


def _mark_incomplete(table: pd.DataFrame, n_genes: list, incomplete: set) -> pd.DataFrame:
    """The CSV columns an incomplete aggregate adds: genes covered and the incomplete flag per row."""
    table = table.copy()
    table["n_genes"] = n_genes
    dg = table["layers"].notna()
    table["incomplete"] = False
    table.loc[dg, "incomplete"] = [
        (int(r["layers"]), int(r["units"]), float(r["dropout"])) in incomplete for _, r in table[dg].iterrows()
    ]
    return table


def main_table(
    summary: pd.DataFrame, task: str, paper_reference: bool, incomplete: frozenset = frozenset()
) -> tuple[pd.DataFrame, str]:
    """Table 1 (task 'geo') or 2 ('cross'): D-GEX at the chosen dropout per architecture, plus baselines.

    ``incomplete``: ``(layers, units, dropout)`` of grid points that lack target parts (marked †).
    """
    t = TASKS[task]
    pick = choose(summary, task)
    rows, n_genes = [], []
    if pick is not None:
        test = dgex_rows(summary, t["validation"], t["test"])
        test = test[test["dropout"] == pick["dropout"]].sort_values(["units", "layers"])
        best = test["mae_mean"].min()
        for _, r in test.iterrows():
            rows.append(
                {
                    "method": pct(pick["dropout"]),
                    "layers": r["layers"],
                    "units": r["units"],
                    "dropout": pick["dropout"],
                    "mae_mean": r["mae_mean"],
                    "mae_std": r["mae_std"],
                    "best": bool(r["mae_mean"] == best),
                    "selected": bool((r["layers"], r["units"]) == (pick["layers"], pick["units"])),
                    "paper_mae": PAPER[task].get((r["layers"], r["units"])),
                }
            )
            n_genes.append(r["n_genes"])
    for _, r in baseline_rows(summary, t["validation"], t["test"]).sort_values("method").iterrows():
        rows.append({**_baseline_row(r), "best": False, "selected": False, "paper_mae": PAPER[task].get(r["method"])})
        n_genes.append(r["n_genes"])
    table = pd.DataFrame(
        rows, columns=["method", "layers", "units", "dropout", "mae_mean", "mae_std", "best", "selected", "paper_mae"]
    )
    if paper_reference:
        table["difference"] = table["mae_mean"] - table["paper_mae"].astype(float)
    else:
        table = table.drop(columns="paper_mae")
    md = _main_markdown(table, task, pick, paper_reference, incomplete)
    if incomplete:
        table = _mark_incomplete(table, n_genes, incomplete)
    return table, md


def _main_markdown(
    table: pd.DataFrame, task: str, pick: dict | None, paper_reference: bool, incomplete: frozenset = frozenset()
) -> str:
    t = TASKS[task]
    num = {"geo": "1", "cross": "2"}[task]
    lines = [
        f"**Table {num}.** Overall error on {t['title']} (MAE per gene, mean ± std over genes; lower is "
        f"better). Models selected by {t['validation']}."
    ]
    if pick is None:
        return "\n".join(lines + ["", "No D-GEX runs."]) + "\n"
    by = ", ".join(f"{pct(float(d))} {fmt(v)}" for d, v in pick["validation_by_dropout"].items())
    lines.append(
        f"Dropout shown: {pct(pick['dropout'])}, the rate whose best architecture has the lowest "
        f"{t['validation']} error ({by}; paper: {pct(PAPER[task]['dropout'])}). **Bold**: the best "
        f"{pct(pick['dropout'])} architecture on {t['title']}; <u>underlined</u>: the architecture selected by {t['validation']} "
        f"({pick['layers']}×{pick['units']})."
    )
    lines.append("")
    dg = table[table["layers"].notna()]
    layers = sorted(dg["layers"].astype(int).unique())
    header = ["D-GEX units \\ hidden layers"] + [f"{n}" for n in layers]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for units, group in dg.groupby("units"):
        cells = [f"{int(units)}"]
        for n in layers:
            r = group[group["layers"] == n]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            text = fmt(r["mae_mean"], r["mae_std"])
            if r["best"]:
                text = f"**{text}**"
            if r["selected"]:
                text = f"<u>{text}</u>"
            if paper_reference:
                text += f" (paper {fmt(r['paper_mae'])}, Δ {_signed(r['difference'])})"
            cells.append(text + _dagger(r, incomplete))
        lines.append("| " + " | ".join(cells) + " |")
    base = table[table["layers"].isna()]
    if len(base):
        lines += [
            "",
            "| method | error |" + (" paper | Δ |" if paper_reference else ""),
            "|---|---|" + ("---|---|" if paper_reference else ""),
        ]
        for _, r in base.iterrows():
            extra = f" {fmt(r['paper_mae'])} | {_signed(r['difference'])} |" if paper_reference else ""
            lines.append(f"| {r['method']} | {fmt(r['mae_mean'], r['mae_std'])} |{extra}")
    return "\n".join(lines) + "\n"


def _signed(v) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return ("+" if v >= 0 else "-") + fmt(abs(v))


def supplementary(summary: pd.DataFrame, name: str, incomplete: frozenset = frozenset()) -> tuple[pd.DataFrame, str]:
    """S2-S5: every architecture x dropout on one split (plus the baselines); † marks ``incomplete`` grid points."""
    split, selected_by = SUPPLEMENT[name]
    dg = dgex_rows(summary, selected_by, split)
    rows = [
        {
            "method": "D-GEX",
            "layers": r["layers"],
            "units": r["units"],
            "dropout": r["dropout"],
            "mae_mean": r["mae_mean"],
            "mae_std": r["mae_std"],
        }
        for _, r in dg.iterrows()
    ]
    base = baseline_rows(summary, selected_by, split)
    rows += [_baseline_row(r) for _, r in base.iterrows()]
    table = pd.DataFrame(rows, columns=["method", "layers", "units", "dropout", "mae_mean", "mae_std"])
    if incomplete:
        table = _mark_incomplete(table, list(dg["n_genes"]) + list(base["n_genes"]), incomplete)
    lines = [
        f"**Table {name[5:]}.** Overall error on {split} for every architecture and dropout rate "
        f"(models selected by {selected_by}; mean ± std over genes).",
        "",
    ]
    if dg.empty:
        return table, "\n".join(lines + ["No D-GEX runs on this split."]) + "\n"
    dropouts = sorted(dg["dropout"].unique())
    best = dg["mae_mean"].min()
    header = ["architecture"] + [pct(d) for d in dropouts]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (layers, units), group in dg.groupby(["layers", "units"]):
        cells = [f"{layers}×{units}"]
        for d in dropouts:
            r = group[group["dropout"] == d]
            text = fmt(r["mae_mean"].iloc[0], r["mae_std"].iloc[0]) if len(r) else ""
            text = f"**{text}**" if len(r) and r["mae_mean"].iloc[0] == best else text
            cells.append(text + (_dagger(r.iloc[0], incomplete) if len(r) else ""))
        lines.append("| " + " | ".join(cells) + " |")
    for _, r in base.sort_values("method").iterrows():
        lines.append(f"| {r['method']} | {fmt(r['mae_mean'], r['mae_std'])} |" + " |" * (len(dropouts) - 1))
    return table, "\n".join(lines) + "\n"


def stats_table(per_gene: pd.DataFrame, summary: pd.DataFrame, n_boot: int = 2000) -> tuple[pd.DataFrame, str]:
    """Best D-GEX of each task vs each baseline: correlations, win rate + Wilcoxon p, bootstrap CIs."""
    rows = []
    for task, t in TASKS.items():
        arch = chosen_arch(summary, task)
        if arch is None or t["test"] not in set(per_gene["split"]):
            continue
        sel = (per_gene["selected_by"] == t["validation"]) & (per_gene["split"] == t["test"])
        model = per_gene[
            sel
            & (per_gene["method"] == "D-GEX")
            & (per_gene["layers"] == arch[0])
            & (per_gene["units"] == arch[1])
            & (per_gene["dropout"] == arch[2])
        ]
        model = model.set_index("ensembl")
        name = arch_name(arch)
        for base_name in BASELINES:
            base = per_gene[sel & (per_gene["method"] == base_name)].set_index("ensembl")
            if base.empty:
                continue
            genes = model.index.intersection(base.index)
            for subset in ("all", "no_overlap"):
                g = genes if subset == "all" else genes[~model.loc[genes, "overlap"].astype(bool).to_numpy()]
                if len(g) == 0:
                    continue
                a, b = model.loc[g], base.loc[g]
                c = compare(a["mae"].to_numpy(), b["mae"].to_numpy())
                lo_a, hi_a = bootstrap_ci(a["mae"].to_numpy(), n_boot=n_boot)
                lo_b, hi_b = bootstrap_ci(b["mae"].to_numpy(), n_boot=n_boot)
                rows.append(
                    {
                        "task": t["title"],
                        "model": name,
                        "baseline": base_name,
                        "genes": subset,
                        "n_genes": c["n_genes"],
                        "dgex_mae": c["mean_a"],
                        "baseline_mae": c["mean_b"],
                        "rel_improvement": c["rel_improvement"],
                        "dgex_wins": c["a_wins"],
                        "wilcoxon_p": c["wilcoxon_p"],
                        "dgex_ci_low": lo_a,
                        "dgex_ci_high": hi_a,
                        "baseline_ci_low": lo_b,
                        "baseline_ci_high": hi_b,
                        "dgex_r": float(a["r"].mean()),
                        "baseline_r": float(b["r"].mean()),
                        "dgex_rho": float(a["rho"].mean()),
                        "baseline_rho": float(b["rho"].mean()),
                    }
                )
    table = pd.DataFrame(rows)
    lines = [
        "**Statistics.** The best D-GEX of each task (chosen on validation) against each baseline on the "
        "test set: mean per-gene MAE with bootstrap 95% CI over genes, relative improvement, fraction of "
        "genes where D-GEX has the lower error (two-sided Wilcoxon signed-rank p), mean per-gene Pearson r "
        "and Spearman ρ; `no_overlap` leaves out the targets that are also landmarks.",
        "",
    ]
    if table.empty:
        return table, "\n".join(lines + ["No D-GEX runs."]) + "\n"
    lines += [
        "| task | model | vs | genes | D-GEX MAE [95% CI] | baseline MAE [95% CI] | rel. impr. | "
        "D-GEX wins | Wilcoxon p | r D-GEX / base | ρ D-GEX / base |",
        "|" + "---|" * 11,
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['task']} | {r['model']} | {r['baseline']} | {r['genes']} ({r['n_genes']}) | "
            f"{fmt(r['dgex_mae'])} [{fmt(r['dgex_ci_low'])}, {fmt(r['dgex_ci_high'])}] | "
            f"{fmt(r['baseline_mae'])} [{fmt(r['baseline_ci_low'])}, {fmt(r['baseline_ci_high'])}] | "
            f"{100 * r['rel_improvement']:.1f}% | {100 * r['dgex_wins']:.2f}% | {r['wilcoxon_p']:.2g} | "
            f"{fmt(r['dgex_r'])} / {fmt(r['baseline_r'])} | {fmt(r['dgex_rho'])} / {fmt(r['baseline_rho'])} |"
        )
    return table, "\n".join(lines) + "\n"


def _write(out: Path, name: str, table: pd.DataFrame, markdown: str, note: str = "") -> list[str]:
    if note:
        markdown += f"\n{note}\n"
    with atomic_path(out / f"{name}.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    write_text(out / f"{name}.md", markdown)
    return [f"{name}.csv", f"{name}.md"]


def make_tables(*, aggregate, output_dir, paper_reference: bool = False, n_boot: int = 2000) -> dict:
    """Write every table into ``output_dir``; returns the content of ``tables.json``."""
    TablesSettings.check(locals())
    agg = load_aggregate(aggregate)
    summary, per_gene = agg["summary"], agg["per_gene"]
    gaps = incomplete_points(agg, aggregate)
    incomplete = frozenset((g["layers"], g["units"], float(g["dropout"])) for g in gaps if "left_out" not in g)
    note = gaps_note(gaps)
    out = Path(output_dir)
    with staged_files(out) as stage:  # all outputs or none
        written, chosen = {}, {}
        for task, t in TASKS.items():
            table, md = main_table(summary, task, paper_reference, incomplete)
            if table.empty:
                md += f"\nNo results on {t['title']}" + (
                    " (no RNA-seq inputs in this run)." if task == "cross" else "."
                )
            written[t["table"]] = _write(stage, t["table"], table, md, note)
            chosen[task] = choose(summary, task)
        for name in SUPPLEMENT:
            written[name] = _write(stage, name, *supplementary(summary, name, incomplete), note)
        written["table_stats"] = _write(stage, "table_stats", *stats_table(per_gene, summary, n_boot), note)
        info = {
            "tables": written,
            "chosen": chosen,
            "paper_reference": paper_reference,
            "rnaseq": bool(agg["info"].get("rnaseq")),
        }
        if gaps:  # only then, so that a complete run's tables.json is what it always was
            info["incomplete"] = incomplete_info(gaps, note)
        write_json(stage / "tables.json", info)
    log.info("wrote %d tables into %s", len(written), out)
    return info
