"""Stage ``aggregate``: every run's per-gene errors and histories in one folder.

Reads finished run folders (``run.json`` + ``per_gene.csv``, and
``history.csv`` for D-GEX) and writes ``OUT/``:

* ``per_gene.csv.gz`` -- all per-gene rows, columns :data:`PER_GENE_AGG`;
  the target parts of a D-GEX grid point are concatenated so that each
  (method, architecture, dropout, selected_by, split) covers every gene once;
* ``summary.csv`` -- mean/std over genes per (method, architecture, dropout,
  selected_by, split), with and without the overlap genes;
* ``history.csv`` -- per grid point and epoch, the overall MAE of each
  evaluation split over all targets (gene-count-weighted mean of the parts);
* ``runs.csv`` -- one row per run (epochs, best epochs, time, throughput);
* ``aggregate.json`` -- the grid found and whether RNA-seq splits exist.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import EVAL_SPLITS
from .errors import InputError
from .io import atomic_path, write_json
from .metrics import read_per_gene
from .runs import read_run_info

log = logging.getLogger(__name__)

ARCH = ["layers", "units", "dropout"]
KEY = ["method", *ARCH, "selected_by", "split"]
PER_GENE_AGG = [*KEY, "ensembl", "symbol", "entrez", "part", "overlap", "mae", "r", "rho"]


def _dgex_runs(dirs) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    frames, histories, runs = [], [], []
    for d in map(Path, dirs):
        info = read_run_info(d)
        cfg = info["config"]
        arch = {"layers": int(cfg["layers"]), "units": int(cfg["units"]), "dropout": float(cfg["dropout"])}
        pg = read_per_gene(d / "per_gene.csv").assign(**arch)
        frames.append(pg)
        hist = pd.read_csv(d / "history.csv").assign(**arch, part=str(cfg["part"]), n_genes=info["n_targets"])
        histories.append(hist)
        runs.append(
            {
                "method": "D-GEX",
                **arch,
                "part": cfg["part"],
                "dir": str(d),
                "dataset": info.get("dataset"),
                "best_epoch_geo_va": info["best"].get("geo-va", {}).get("epoch"),
                "best_epoch_1000g_va": info["best"].get("1000g-va", {}).get("epoch"),
                "epochs": info.get("epochs"),
                "wall_seconds": info.get("wall_seconds"),
                "parameters": info.get("parameters"),
                "profiles_per_second": info.get("profiles_per_second"),
                "device": info.get("device"),
            }
        )
    return (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(),
        pd.concat(histories, ignore_index=True) if histories else pd.DataFrame(),
        runs,
    )


def _baseline_runs(dirs) -> tuple[pd.DataFrame, list[dict]]:
    frames, runs = [], []
    for d in map(Path, dirs):
        info = read_run_info(d)
        frames.append(read_per_gene(d / "per_gene.csv").assign(layers=np.nan, units=np.nan, dropout=np.nan))
        runs.append(
            {
                "method": info.get("method"),
                "layers": None,
                "units": None,
                "dropout": None,
                "part": None,
                "dir": str(d),
                "dataset": info.get("dataset"),
                "epochs": None,
                "wall_seconds": info.get("seconds", {}).get("total") if isinstance(info.get("seconds"), dict) else None,
                "device": "cpu",
            }
        )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), runs


def check_coverage(per_gene: pd.DataFrame, runs: list[dict]) -> None:
    """Every grid point's parts must cover the same splits and never repeat a gene."""
    dgex = per_gene[per_gene["method"] == "D-GEX"]
    if dgex.empty:
        return
    dup = dgex.duplicated(KEY + ["ensembl"])
    if dup.any():
        row = dgex[dup].iloc[0]
        raise InputError(
            f"gene {row['ensembl']} appears in more than one run of {int(row['layers'])}x"
            f"{int(row['units'])} dropout {row['dropout']:g}: pass each target part exactly once"
        )
    splits = dgex.groupby(ARCH + ["part"])["split"].agg(lambda s: tuple(sorted(set(s))))
    for arch, group in splits.groupby(level=[0, 1, 2]):
        if group.nunique() > 1:
            dirs = [r["dir"] for r in runs if (r["layers"], r["units"], r["dropout"]) == arch]
            raise InputError(
                f"the parts of grid point {arch} were evaluated on different splits "
                f"({', '.join(dirs)}); retrain them on the same dataset"
            )


def weighted_history(histories: pd.DataFrame) -> pd.DataFrame:
    """Per grid point and epoch: overall MAE over all targets = gene-weighted mean of the parts' MAEs."""
    if histories.empty:
        return pd.DataFrame(columns=[*ARCH, "epoch"])
    splits = [s for s in EVAL_SPLITS if s in histories.columns]
    n_parts = histories.groupby(ARCH)["part"].nunique().rename("n_parts")
    h = histories.join(n_parts, on=ARCH)
    w = h["n_genes"].to_numpy(float)[:, None]
    weighted = pd.DataFrame(h[splits].to_numpy(float) * w, columns=splits)
    weighted[ARCH + ["epoch"]] = h[ARCH + ["epoch"]].to_numpy()
    weighted["n_genes"] = h["n_genes"].to_numpy()
    weighted["parts_seen"] = 1
    g = weighted.groupby(ARCH + ["epoch"], as_index=False).sum()
    g = g.join(n_parts, on=ARCH)
    g = g[g["parts_seen"] == g["n_parts"]]  # only epochs every part reached
    for s in splits:
        g[s] = g[s] / g["n_genes"]
    out = g[ARCH + ["epoch"] + splits].copy()
    out[["layers", "units"]] = out[["layers", "units"]].astype(int)
    out["epoch"] = out["epoch"].astype(int)
    return out.sort_values(ARCH + ["epoch"]).reset_index(drop=True)


def summarise(per_gene: pd.DataFrame) -> pd.DataFrame:
    """Mean/std over genes per method x architecture x selection x split (std with ddof=0, as the paper)."""
    pg = per_gene.copy()
    pg[ARCH] = pg[ARCH].fillna(-1)  # groupby drops NaN keys; baselines have no architecture
    no = pg[~pg["overlap"].astype(bool)]
    agg = pg.groupby(KEY).agg(
        n_genes=("mae", "size"),
        mae_mean=("mae", "mean"),
        mae_std=("mae", lambda s: float(np.std(s))),
        r_mean=("r", "mean"),
        rho_mean=("rho", "mean"),
    )
    agg_no = no.groupby(KEY).agg(
        mae_mean_no_overlap=("mae", "mean"), mae_std_no_overlap=("mae", lambda s: float(np.std(s)))
    )
    out = agg.join(agg_no).reset_index()
    out[ARCH] = out[ARCH].replace(-1, np.nan)
    return out


def aggregate(*, dgex_runs, baseline_runs, output_dir) -> dict:
    """Collect runs into ``output_dir``; returns the content of ``aggregate.json``."""
    per_gene_d, histories, runs_d = _dgex_runs(dgex_runs or [])
    per_gene_b, runs_b = _baseline_runs(baseline_runs or [])
    runs = runs_d + runs_b
    if not runs:
        raise InputError("no runs given; pass --dgex-runs and/or --baseline-runs folders")
    datasets = {r["dataset"] for r in runs if r.get("dataset")}
    if len(datasets) > 1:
        raise InputError(
            f"runs come from different datasets ({', '.join(sorted(datasets))}); "
            f"aggregate the runs of one dataset at a time"
        )
    per_gene = pd.concat([f for f in (per_gene_d, per_gene_b) if not f.empty], ignore_index=True)[PER_GENE_AGG]
    check_coverage(per_gene, runs_d)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_gene.csv.gz") as tmp:
        per_gene.to_csv(tmp, index=False, compression="gzip", float_format="%.6g")
    summary = summarise(per_gene)
    with atomic_path(out / "summary.csv") as tmp:  # full precision: tables choose models by these means
        summary.to_csv(tmp, index=False, float_format="%.10g")
    with atomic_path(out / "history.csv") as tmp:
        weighted_history(histories).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_path(out / "runs.csv") as tmp:
        pd.DataFrame(runs).to_csv(tmp, index=False)
    dg = per_gene[per_gene["method"] == "D-GEX"]
    info = {
        "dataset": next(iter(datasets), None),
        "methods": sorted(per_gene["method"].unique()),
        "grid": {
            "layers": sorted(int(v) for v in dg["layers"].unique()),
            "units": sorted(int(v) for v in dg["units"].unique()),
            "dropout": sorted(float(v) for v in dg["dropout"].unique()),
        },
        "splits": [s for s in EVAL_SPLITS if s in set(per_gene["split"])],
        "rnaseq": bool({"1000g-va", "gtex-te"} <= set(per_gene["split"])),
        "n_genes": int(per_gene["ensembl"].nunique()),
        "n_overlap": int(per_gene.drop_duplicates("ensembl")["overlap"].astype(bool).sum()),
        "n_runs": {"dgex": len(runs_d), "baselines": len(runs_b)},
    }
    write_json(out / "aggregate.json", info)
    log.info("aggregated %d D-GEX and %d baseline runs into %s", len(runs_d), len(runs_b), out)
    return info


def load_aggregate(path) -> dict:
    """Read an aggregate folder: ``{"per_gene", "summary", "history", "runs": DataFrame, "info": dict}``."""
    path = Path(path)
    files = {
        "per_gene": "per_gene.csv.gz",
        "summary": "summary.csv",
        "history": "history.csv",
        "runs": "runs.csv",
        "info": "aggregate.json",
    }
    missing = [f for f in files.values() if not (path / f).exists()]
    if missing:
        raise InputError(f"{path}: not an aggregate folder (missing {', '.join(missing)}); run `dgex aggregate` first")
    try:
        out = {
            k: pd.read_csv(path / f, dtype={"ensembl": str, "symbol": str, "entrez": str})
            for k, f in files.items()
            if k != "info"
        }
        out["info"] = json.loads((path / files["info"]).read_text())
    except (ValueError, OSError) as exc:
        raise InputError(f"{path}: corrupt aggregate ({exc}); rerun `dgex aggregate`") from None
    for col in ("mae", "method", "split", "selected_by"):
        if col not in out["per_gene"].columns:
            raise InputError(f"{path}/per_gene.csv.gz lacks column {col!r}; rerun `dgex aggregate`")
    return out
