"""`dgex aggregate | tables | figures` on synthetic run folders whose right answers are known by construction.

The fake grid has 2 depths x 2 widths x 2 dropout rates x 2 target parts of unequal size. Per-gene errors are
``level(architecture, split) + gene effect``, with levels chosen so that validation picks a dropout rate and
an architecture that the test split alone would not (bold != underlined), and the test flips them to make
sure the choice follows the data, not a constant.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from conftest import assert_one_line_error, run_dgex
from dgex.aggregate import aggregate, load_aggregate
from dgex.errors import InputError
from dgex.figures import make_figures
from dgex.metrics import PER_GENE_COLUMNS
from dgex.tables import PAPER, fmt, make_tables, pct
from helpers_dataset import write_dataset_arrays

LAYERS, UNITS, DROPOUTS = (1, 2), (10, 20), (0.0, 0.25)
PART_SIZES = (12, 8)
SPLITS_BY_SELECTION = {"geo-va": ("geo-va", "geo-te"), "1000g-va": ("1000g-va", "gtex-te")}
ALL_SPLITS = ("geo-va", "geo-te", "1000g-va", "gtex-te")


def _genes():
    rows = []
    for part, n in enumerate(PART_SIZES):
        for _i in range(n):
            g = len(rows)
            rows.append(
                {
                    "ensembl": f"ENSG{g:011d}",
                    "symbol": f"G{g}",
                    "entrez": str(1000 + g),
                    "part": part,
                    "overlap": g % 5 == 0,
                }
            )
    return pd.DataFrame(rows)


def _level(layers, units, dropout, split, prefer):
    """Overall error level; `prefer` maps a validation split to the dropout rate it should pick."""
    base = {"geo-va": 0.40, "geo-te": 0.41, "1000g-va": 0.60, "gtex-te": 0.55}[split]
    val = "geo-va" if split.startswith("geo") else "1000g-va"
    lvl = base - 0.01 * (units == 20) - 0.004 * (layers == 2)
    lvl -= 0.02 * (dropout == prefer[val])
    if split == "geo-te":  # on the test split the 1-layer nets are better: best != selected
        lvl += 0.008 * (layers == 2)
    return lvl


def _write_run(run_dir, info, frame):
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(info))
    frame[PER_GENE_COLUMNS].to_csv(run_dir / "per_gene.csv", index=False)


def make_grid(root, prefer=None, rnaseq=True, seed=0, dataset="ds.h5"):
    """Write the fake D-GEX and baseline run folders; returns (dgex_dirs, baseline_dirs, raw per-gene frame).

    ``root/dataset`` is a processed dataset with the fake target genes and parts (what aggregate checks the
    runs' parts against); its expression values are never read.
    """
    prefer = prefer or {"geo-va": 0.25, "1000g-va": 0.0}
    rng = np.random.default_rng(seed)
    genes = _genes()
    root.mkdir(parents=True, exist_ok=True)
    dataset = str(
        write_dataset_arrays(
            root / dataset,
            {"geo-tr": (np.zeros((2, 3)), np.zeros((2, len(genes))))},
            parts=genes["part"].to_numpy(),
            target_ids=list(genes["ensembl"]),
        )
    )
    effect = rng.normal(scale=0.05, size=len(genes))
    sels = {k: v for k, v in SPLITS_BY_SELECTION.items() if rnaseq or k == "geo-va"}
    splits = [s for s in ALL_SPLITS if rnaseq or s.startswith("geo")]
    dgex_dirs, base_dirs, raw = [], [], []
    for layers in LAYERS:
        for units in UNITS:
            for dropout in DROPOUTS:
                for part, n in enumerate(PART_SIZES):
                    tg = genes[genes["part"] == part]
                    rows = []
                    for sel, sel_splits in sels.items():
                        for split in sel_splits:
                            mae = _level(layers, units, dropout, split, prefer) + effect[tg.index]
                            rows.append(
                                tg.assign(
                                    method="D-GEX",
                                    selected_by=sel,
                                    split=split,
                                    mae=mae,
                                    r=0.5 + 0 * mae,
                                    rho=0.4 + 0 * mae,
                                )
                            )
                    frame = pd.concat(rows, ignore_index=True)
                    raw.append(frame.assign(layers=layers, units=units, dropout=dropout))
                    n_epochs = 6 if part == 0 else 5  # part 1 stopped earlier: epoch 6 is incomplete
                    hist = pd.DataFrame({"epoch": np.arange(1, n_epochs + 1)})
                    for s in splits:
                        hist[s] = _level(layers, units, dropout, s, prefer) + 0.1 / hist["epoch"] + 0.01 * part
                    d = root / f"{layers}x{units}_d{dropout:g}" / f"part{part}"
                    _write_run(
                        d,
                        {
                            "config": {"layers": layers, "units": units, "dropout": dropout, "part": part},
                            "n_targets": n,
                            "dataset": dataset,
                            "epochs": n_epochs,
                            "best": {s: {"epoch": 3, "mae": 0.4} for s in sels},
                        },
                        frame,
                    )
                    hist.to_csv(d / "history.csv", index=False)
                    dgex_dirs.append(d)
    for method, offset in (("LR", 0.03), ("KNN-GE", 0.08)):
        rows = []
        for sel, sel_splits in sels.items():
            for split in sel_splits:
                mae = _level(1, 10, 0.1, split, prefer) + offset + effect + rng.normal(scale=0.02, size=len(genes))
                rows.append(
                    genes.assign(
                        method=method, selected_by=sel, split=split, mae=mae, r=0.3 + 0 * mae, rho=0.2 + 0 * mae
                    )
                )
        frame = pd.concat(rows, ignore_index=True)
        raw.append(frame)
        d = root / "baselines" / method
        _write_run(d, {"method": method, "dataset": dataset}, frame)
        base_dirs.append(d)
    return dgex_dirs, base_dirs, pd.concat(raw, ignore_index=True)


@pytest.fixture
def grid(tmp_path):
    dgex_dirs, base_dirs, raw = make_grid(tmp_path / "runs")
    agg = tmp_path / "aggregate"
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=agg)
    return {"root": tmp_path, "agg": agg, "raw": raw, "dgex": dgex_dirs, "base": base_dirs}


def _raw_mean(raw, method, sel, split, arch=None):
    m = (raw["method"] == method) & (raw["selected_by"] == sel) & (raw["split"] == split)
    if arch is not None:
        m &= (raw["layers"] == arch[0]) & (raw["units"] == arch[1]) & (raw["dropout"] == arch[2])
    return raw[m]


# --------------------------------------------------------------------------- aggregate
def test_aggregate_covers_every_gene_once_and_summaries_are_per_gene_means(grid):
    agg = load_aggregate(grid["agg"])
    pg, summary, info = agg["per_gene"], agg["summary"], agg["info"]
    n_genes = sum(PART_SIZES)
    assert info["n_genes"] == n_genes and info["rnaseq"] is True
    assert info["grid"] == {"layers": list(LAYERS), "units": list(UNITS), "dropout": list(DROPOUTS)}
    assert info["n_runs"] == {"dgex": 16, "baselines": 2}
    dg = pg[pg["method"] == "D-GEX"]
    assert (dg.groupby(["layers", "units", "dropout", "selected_by", "split"]).size() == n_genes).all()
    for _, row in summary.iterrows():
        arch = None if row["method"] != "D-GEX" else (row["layers"], row["units"], row["dropout"])
        sub = _raw_mean(grid["raw"], row["method"], row["selected_by"], row["split"], arch)
        assert row["n_genes"] == n_genes
        assert row["mae_mean"] == pytest.approx(sub["mae"].mean(), abs=1e-6)
        assert row["mae_std"] == pytest.approx(np.std(sub["mae"]), abs=1e-6)
        assert row["mae_mean_no_overlap"] == pytest.approx(sub.loc[~sub["overlap"], "mae"].mean(), abs=1e-6)


def test_history_is_gene_weighted_and_keeps_only_epochs_all_parts_reached(grid):
    hist = load_aggregate(grid["agg"])["history"]
    h = hist[(hist["layers"] == 2) & (hist["units"] == 20) & (hist["dropout"] == 0.25)]
    assert list(h["epoch"]) == [1, 2, 3, 4, 5]
    parts = [pd.read_csv(grid["root"] / "runs" / "2x20_d0.25" / f"part{p}" / "history.csv") for p in (0, 1)]
    for split in ALL_SPLITS:
        want = (parts[0][split][:5] * PART_SIZES[0] + parts[1][split][:5] * PART_SIZES[1]) / sum(PART_SIZES)
        np.testing.assert_allclose(h[split].to_numpy(), want.to_numpy(), rtol=1e-5)


def test_aggregate_rejects_a_part_given_twice(grid, tmp_path):
    with pytest.raises(InputError, match="more than one run"):
        aggregate(dgex_runs=grid["dgex"] + grid["dgex"][:1], baseline_runs=[], output_dir=tmp_path / "a2")
    assert not (tmp_path / "a2" / "per_gene.csv.gz").exists()


def test_aggregate_rejects_unfinished_and_mixed_runs(grid, tmp_path):
    (grid["dgex"][3] / "run.json").unlink()
    res = run_dgex("aggregate", "--dgex-runs", *grid["dgex"], "--output-dir", tmp_path / "a3")
    assert_one_line_error(res, "no run.json", "rerun the workflow")
    other, _, _ = make_grid(tmp_path / "other", dataset="other.h5")
    res = run_dgex("aggregate", "--dgex-runs", *grid["dgex"][:3], *other[:1], "--output-dir", tmp_path / "a3")
    assert_one_line_error(res, "different datasets")
    res = run_dgex("aggregate", "--output-dir", tmp_path / "a3")
    assert_one_line_error(res, "no runs given")
    assert not (tmp_path / "a3" / "per_gene.csv.gz").exists()


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("prefer", [{"geo-va": 0.25, "1000g-va": 0.0}, {"geo-va": 0.0, "1000g-va": 0.25}])
def test_main_tables_show_the_dropout_and_architecture_chosen_on_validation(tmp_path, prefer):
    dgex_dirs, base_dirs, raw = make_grid(tmp_path / "runs", prefer=prefer)
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=tmp_path / "agg")
    info = make_tables(aggregate=tmp_path / "agg", output_dir=tmp_path / "tables", n_boot=50)
    for task, name, val, test in (("geo", "table1", "geo-va", "geo-te"), ("cross", "table2", "1000g-va", "gtex-te")):
        assert info["chosen"][task]["dropout"] == prefer[val]
        table = pd.read_csv(tmp_path / "tables" / f"{name}.csv")
        dg = table[table["layers"].notna()]
        assert set(dg["dropout"]) == {prefer[val]} and len(dg) == len(LAYERS) * len(UNITS)
        for _, r in dg.iterrows():
            want = _raw_mean(raw, "D-GEX", val, test, (r["layers"], r["units"], r["dropout"]))["mae"].mean()
            assert r["mae_mean"] == pytest.approx(want, abs=1e-6)
        # bold = lowest test error; underlined = lowest validation error (2x20 by construction)
        assert dg.loc[dg["best"], "mae_mean"].item() == pytest.approx(dg["mae_mean"].min())
        sel = dg[dg["selected"]]
        assert len(sel) == 1 and (sel["layers"].item(), sel["units"].item()) == (2, 20)
        assert set(table.loc[table["layers"].isna(), "method"]) == {"LR", "KNN-GE"}
        md = (tmp_path / "tables" / f"{name}.md").read_text()
        assert f"D-GEX-{100 * prefer[val]:g}%" in md and "<u>" in md and "**" in md
        assert "paper" not in table.columns
    # Table 1: best on GEO-te is a 1-layer net, the selected one is 2x20: they differ, so both marks are tested
    t1 = pd.read_csv(tmp_path / "tables" / "table1.csv")
    assert not t1.loc[t1["best"], "selected"].item()


def test_supplementary_tables_list_every_architecture_and_dropout(grid):
    make_tables(aggregate=grid["agg"], output_dir=grid["root"] / "tables", n_boot=50)
    for name, (split, sel) in {
        "tableS2": ("geo-va", "geo-va"),
        "tableS3": ("geo-te", "geo-va"),
        "tableS4": ("1000g-va", "1000g-va"),
        "tableS5": ("gtex-te", "1000g-va"),
    }.items():
        t = pd.read_csv(grid["root"] / "tables" / f"{name}.csv")
        dg = t[t["method"] == "D-GEX"]
        assert len(dg) == len(LAYERS) * len(UNITS) * len(DROPOUTS)
        r = dg.iloc[0]
        want = _raw_mean(grid["raw"], "D-GEX", sel, split, (r["layers"], r["units"], r["dropout"]))["mae"].mean()
        assert r["mae_mean"] == pytest.approx(want, abs=1e-6)


def test_paper_reference_columns(grid):
    make_tables(aggregate=grid["agg"], output_dir=grid["root"] / "t", paper_reference=True, n_boot=50)
    t = pd.read_csv(grid["root"] / "t" / "table1.csv")
    lr = t[t["method"] == "LR"].iloc[0]
    assert lr["paper_mae"] == PAPER["geo"]["LR"]
    assert lr["difference"] == pytest.approx(lr["mae_mean"] - PAPER["geo"]["LR"], abs=1e-5)  # CSV: 6 digits
    assert "paper .3784" not in (grid["root"] / "t" / "table1.md").read_text()  # baselines: own columns
    assert "| LR |" in (grid["root"] / "t" / "table1.md").read_text()


def _read_runs(dirs) -> pd.DataFrame:
    """Every run's per-gene rows with its architecture, read from the run folders (not from the aggregate)."""
    frames = []
    for d in dirs:
        cfg = json.loads((d / "run.json").read_text()).get("config", {})
        frame = pd.read_csv(d / "per_gene.csv", dtype={"ensembl": str})
        frames.append(frame.assign(**{k: float(cfg.get(k, np.nan)) for k in ("layers", "units", "dropout")}))
    return pd.concat(frames, ignore_index=True)


def test_stats_table_columns_match_their_definitions(tmp_path):
    """Every column of table_stats recomputed from the runs' per-gene rows: scipy's Wilcoxon test, relative
    improvement, win rate, bootstrap CIs (scipy's percentile bootstrap), mean r / rho; all and no_overlap."""
    dgex_dirs, base_dirs, _ = make_grid(tmp_path / "runs")
    rng = np.random.default_rng(11)
    for d in dgex_dirs + base_dirs:  # gene-varying correlations, so that their means are worth checking
        frame = pd.read_csv(d / "per_gene.csv", dtype={"ensembl": str, "entrez": str})
        frame["r"], frame["rho"] = rng.uniform(0.1, 0.9, len(frame)), rng.uniform(0.1, 0.9, len(frame))
        frame[PER_GENE_COLUMNS].to_csv(d / "per_gene.csv", index=False)
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=tmp_path / "agg")
    n_boot = 4000
    make_tables(aggregate=tmp_path / "agg", output_dir=tmp_path / "t", n_boot=n_boot)
    st = pd.read_csv(tmp_path / "t" / "table_stats.csv")
    raw = _read_runs(dgex_dirs + base_dirs)
    overlap = set(_genes().loc[_genes()["overlap"], "ensembl"])
    checked = 0
    for task, val, test in (("GEO-te", "geo-va", "geo-te"), ("GTEx-te", "1000g-va", "gtex-te")):
        dg = raw[(raw["method"] == "D-GEX") & (raw["selected_by"] == val)]
        # the network shown: lowest validation MAE over the grid
        layers, units, dropout = dg[dg["split"] == val].groupby(["layers", "units", "dropout"])["mae"].mean().idxmin()
        arch = (int(layers), int(units), dropout)
        for base in ("LR", "KNN-GE"):
            for subset in ("all", "no_overlap"):
                row = st[(st["task"] == task) & (st["baseline"] == base) & (st["genes"] == subset)]
                assert len(row) == 1, (task, base, subset)
                row = row.iloc[0]
                a = _raw_mean(raw, "D-GEX", val, test, arch).set_index("ensembl")
                b = _raw_mean(raw, base, val, test).set_index("ensembl").loc[a.index]
                if subset == "no_overlap":
                    keep = ~a.index.isin(overlap)
                    a, b = a[keep], b[keep]
                assert row["model"] == f"{pct(arch[2])} {arch[0]}×{arch[1]}"
                assert row["n_genes"] == len(a)
                ma, mb = a["mae"].to_numpy(), b["mae"].to_numpy()
                approx = {"rel": 2e-5}  # the CSV keeps 6 significant digits
                assert row["dgex_mae"] == pytest.approx(ma.mean(), **approx)
                assert row["baseline_mae"] == pytest.approx(mb.mean(), **approx)
                assert row["rel_improvement"] == pytest.approx((mb.mean() - ma.mean()) / mb.mean(), **approx)
                assert row["dgex_wins"] == pytest.approx(np.mean(ma < mb), **approx)
                assert row["wilcoxon_p"] == pytest.approx(stats.wilcoxon(ma, mb).pvalue, **approx)
                for col, frame in (("dgex", a), ("baseline", b)):
                    assert row[f"{col}_r"] == pytest.approx(frame["r"].mean(), **approx)
                    assert row[f"{col}_rho"] == pytest.approx(frame["rho"].mean(), **approx)
                    x = frame["mae"].to_numpy()
                    lo, hi = row[f"{col}_ci_low"], row[f"{col}_ci_high"]
                    assert lo < x.mean() < hi
                    ref = stats.bootstrap((x,), np.mean, n_resamples=n_boot, method="percentile", rng=1)
                    ref_lo, ref_hi = ref.confidence_interval
                    width = ref_hi - ref_lo
                    assert abs(lo - ref_lo) < 0.1 * width and abs(hi - ref_hi) < 0.1 * width, (col, lo, hi, ref_lo)
                checked += 1
    assert checked == 8 and len(st) == 8
    assert (st["rel_improvement"] > 0).all() and (st["wilcoxon_p"] < 0.05).all()  # D-GEX is better by construction


def test_stats_table_confidence_intervals_narrow_with_more_genes():
    """16 times the genes (same spread): a quarter of the bootstrap CI width; each CI holds its mean."""
    from dgex.tables import stats_table

    def table(n_genes):
        rng = np.random.default_rng(n_genes)
        genes = pd.DataFrame(
            {"ensembl": [f"E{i}" for i in range(n_genes)], "symbol": "", "entrez": "", "part": 0, "overlap": False}
        )
        effect = rng.gamma(4, 0.1, n_genes)
        rows = [
            genes.assign(method="D-GEX", layers=1, units=10, dropout=0.0, mae=effect),
            genes.assign(method="LR", layers=np.nan, units=np.nan, dropout=np.nan, mae=effect + 0.05),
        ]
        pg = pd.concat(rows).assign(selected_by="geo-va", split="geo-te", r=0.5, rho=0.5)
        summary = pd.DataFrame(
            [{"method": "D-GEX", "selected_by": "geo-va", "split": "geo-va", "layers": 1, "units": 10}]
        ).assign(dropout=0.0, mae_mean=0.4, n_genes=n_genes)
        return stats_table(pg, summary, n_boot=2000)[0].iloc[0]

    small, large = table(100), table(1600)
    for r in (small, large):
        assert r["dgex_ci_low"] < r["dgex_mae"] < r["dgex_ci_high"]
    ratio = (large["dgex_ci_high"] - large["dgex_ci_low"]) / (small["dgex_ci_high"] - small["dgex_ci_low"])
    assert 0.15 < ratio < 0.4  # 1/sqrt(16) = 0.25 in expectation


def test_tables_cli_rejects_a_folder_that_is_not_an_aggregate(tmp_path):
    res = run_dgex("tables", "--aggregate", tmp_path, "--output-dir", tmp_path / "t")
    assert_one_line_error(res, "not an aggregate folder", "dgex aggregate")
    assert not (tmp_path / "t" / "table1.csv").exists()


# --------------------------------------------------------------------------- figures
def test_figures_are_written_with_win_fractions_from_the_data(grid):
    info = make_figures(aggregate=grid["agg"], output_dir=grid["root"] / "fig")
    assert info["skipped"] == []
    for n in range(1, 6):
        png = (grid["root"] / "fig" / f"figure{n}.png").read_bytes()
        pdf = (grid["root"] / "fig" / f"figure{n}.pdf").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert pdf[:5] == b"%PDF-"
    raw = grid["raw"]
    model = _raw_mean(raw, "D-GEX", "1000g-va", "gtex-te", (2, 20, 0.0)).set_index("ensembl")["mae"]
    knn = _raw_mean(raw, "KNN-GE", "1000g-va", "gtex-te").set_index("ensembl")["mae"].loc[model.index]
    assert info["figures"]["figure4"]["dgex_wins"]["KNN-GE"] == pytest.approx(float(np.mean(model < knn)))
    assert "2×20" in info["figures"]["figure4"]["caption"]
    # Figure 5's caption states where each curve bottoms out, read from the history
    hist = load_aggregate(grid["agg"])["history"]
    h = hist[(hist["layers"] == 2) & (hist["units"] == hist[hist["layers"] == 2]["units"].max())]
    for d, g in h.groupby("dropout"):
        best = g.loc[g["gtex-te"].idxmin()]
        assert (
            f"{pct(float(d))} {fmt(g.sort_values('epoch')['gtex-te'].iloc[0])} at epoch"
            in info["figures"]["figure5"]["caption"]
        )
        assert f"lowest {fmt(best['gtex-te'])} at epoch {int(best['epoch'])}" in info["figures"]["figure5"]["caption"]
    saved = json.loads((grid["root"] / "fig" / "figures.json").read_text())
    assert saved["figures"].keys() == info["figures"].keys()


def test_geo_only_runs_skip_the_cross_platform_outputs(tmp_path):
    dgex_dirs, base_dirs, _ = make_grid(tmp_path / "runs", rnaseq=False)
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=tmp_path / "agg")
    assert load_aggregate(tmp_path / "agg")["info"]["rnaseq"] is False
    info = make_figures(aggregate=tmp_path / "agg", output_dir=tmp_path / "fig")
    assert info["skipped"] == ["figure4", "figure5"]
    assert not (tmp_path / "fig" / "figure4.png").exists()
    make_tables(aggregate=tmp_path / "agg", output_dir=tmp_path / "t", n_boot=20)
    assert "no RNA-seq inputs" in (tmp_path / "t" / "table2.md").read_text()
    assert pd.read_csv(tmp_path / "t" / "table1.csv")["layers"].notna().sum() == 4


def test_figures_need_dgex_runs(grid, tmp_path):
    aggregate(dgex_runs=[], baseline_runs=grid["base"], output_dir=tmp_path / "agg")
    res = run_dgex("figures", "--aggregate", tmp_path / "agg", "--output-dir", tmp_path / "fig")
    assert_one_line_error(res, "no D-GEX runs")
