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
* ``aggregate.json`` -- the grid found, whether RNA-seq splits exist, the
  target parts every grid point must have and the ``incomplete`` grid points.

Every grid point must have a run for each target part of the runs' dataset
(or one run on all targets): a missing part would silently turn a grid point's
error into a mean over fewer genes than its neighbours'.  Such a grid point is
an error naming it and its missing parts, unless ``allow_incomplete`` is set;
then ``aggregate.json`` lists it under ``incomplete`` and the tables and
figures state it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import EVAL_SPLITS, ProcessedDataset
from .errors import InputError
from .io import atomic_path, refuse_overwriting_inputs, staged_files, write_json
from .metrics import read_per_gene
from .runs import check_dataset, read_baseline_run, read_dgex_run, read_history

log = logging.getLogger(__name__)

ARCH = ["layers", "units", "dropout"]
KEY = ["method", *ARCH, "selected_by", "split"]
PER_GENE_AGG = [*KEY, "ensembl", "symbol", "entrez", "part", "overlap", "mae", "r", "rho"]
#: The files of an aggregate folder.
AGGREGATE_FILES = {
    "per_gene": "per_gene.csv.gz",
    "summary": "summary.csv",
    "history": "history.csv",
    "runs": "runs.csv",
    "info": "aggregate.json",
}


def _dgex_runs(dirs, allow_incomplete: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    frames, histories, runs = [], [], []
    for d in map(Path, dirs):
        if allow_incomplete and not (d / "run.json").is_file():
            log.warning("%s: no run.json (unfinished run), left out: --allow-incomplete", d)
            continue
        info = read_dgex_run(d)
        layers, units, dropout = info["arch"]
        arch = {"layers": layers, "units": units, "dropout": dropout}
        pg = read_per_gene(d / "per_gene.csv").assign(**arch)
        rows = pg.groupby(["selected_by", "split"]).size()
        if (rows != info["n_targets"]).any():
            raise InputError(
                f"{d / 'per_gene.csv'} has {int(rows.min())} rows for some evaluation but the run has "
                f"{info['n_targets']} targets: the file is incomplete; delete the run folder and retrain it"
            )
        frames.append(pg)
        hist = read_history(d / "history.csv")
        missing = sorted(set(pg["split"]) - set(hist.columns))
        if missing:
            raise InputError(
                f"{d / 'history.csv'}: training history lacks the evaluation split(s) {', '.join(missing)} that "
                f"per_gene.csv has; delete the run folder and retrain it"
            )
        histories.append(hist.assign(**arch, part=str(info["part"]), n_genes=info["n_targets"]))
        runs.append(
            {
                "method": "D-GEX",
                **arch,
                "part": info["part"],
                "n_targets": info["n_targets"],
                "dir": str(d),
                "dataset": info.get("dataset"),
                "dataset_fingerprint": info.get("dataset_fingerprint"),
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
        info = read_baseline_run(d)
        frames.append(read_per_gene(d / "per_gene.csv").assign(layers=np.nan, units=np.nan, dropout=np.nan))
        runs.append(
            {
                "method": info["method"],
                "layers": None,
                "units": None,
                "dropout": None,
                "part": None,
                "dir": str(d),
                "dataset": info.get("dataset"),
                "dataset_fingerprint": info.get("dataset_fingerprint"),
                "epochs": None,
                "wall_seconds": info.get("seconds", {}).get("total") if isinstance(info.get("seconds"), dict) else None,
                "device": "cpu",
            }
        )
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), runs


def check_distinct(runs: list[dict]) -> None:
    """No run folder given twice, and no D-GEX grid point x part from two folders (its genes would count twice)."""
    seen: dict = {}
    for r in runs:
        key = Path(r["dir"]).resolve()
        if key in seen:
            what = (
                f"grid point {r['layers']}x{r['units']} dropout {r['dropout']:g} part "
                f"{'all' if r['part'] is None else r['part']}"
                if r["method"] == "D-GEX"
                else f"baseline {r['method']}"
            )
            raise InputError(
                f"run folder {r['dir']} given more than once, so {what} would have more than one run; "
                f"pass each run folder once"
            )
        seen[key] = r
    points: dict = {}
    for r in runs:
        if r["method"] != "D-GEX":
            continue
        key = (r["layers"], r["units"], r["dropout"], r["part"])
        if key in points:
            raise InputError(
                f"grid point {r['layers']}x{r['units']} dropout {r['dropout']:g} part "
                f"{'all' if r['part'] is None else r['part']} has more than one run ({points[key]['dir']}, {r['dir']}); "
                f"pass one run folder per grid point and part"
            )
        points[key] = r
    methods: dict = {}
    for r in runs:
        if r["method"] == "D-GEX":
            continue
        if r["method"] in methods:
            raise InputError(
                f"baseline {r['method']} has more than one run ({methods[r['method']]['dir']}, {r['dir']}); "
                f"pass one run folder per method"
            )
        methods[r["method"]] = r


def _dataset_key(run: dict) -> str | None:
    """What identifies a run's dataset: its content fingerprint (a path only for runs of an older dgex)."""
    if run.get("dataset_fingerprint"):
        return run["dataset_fingerprint"]
    return f"path {run['dataset']}" if run.get("dataset") else None


#: Integer columns of runs.csv: baselines leave them empty, which would make pandas write every value as a float.
RUNS_INT_COLUMNS = [
    "layers",
    "units",
    "part",
    "n_targets",
    "best_epoch_geo_va",
    "best_epoch_1000g_va",
    "epochs",
    "parameters",
]


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """The rows of ``runs.csv``; integer columns stay integers (nullable: empty for the baselines)."""
    frame = pd.DataFrame(runs)
    for col in RUNS_INT_COLUMNS:
        if col in frame.columns:
            frame[col] = frame[col].astype("Int64")
    return frame


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


def expected_parts(runs: list[dict], dataset=None) -> tuple[dict, dict, str]:
    """``({part: n_targets}, fingerprint, path)`` of the dataset the runs were trained on.

    ``dataset`` or, by default, the first dataset their run.json names that still exists.
    """
    path = dataset
    if path is None:
        recorded = list(dict.fromkeys(r["dataset"] for r in runs if r.get("dataset")))
        path = next((p for p in recorded if Path(p).is_file()), None)
        if path is None:
            raise InputError(
                f"cannot check that every grid point has all its target parts: the runs' dataset "
                f"{', '.join(recorded) or '(not recorded in run.json)'} is not found from {Path.cwd()}; pass "
                f"--dataset with the processed dataset the runs were trained on (or --allow-incomplete)"
            )
    with ProcessedDataset(path) as ds:
        parts = ds.genes().targets["part"].value_counts()
        fingerprint = ds.fingerprint()
    return {int(k): int(v) for k, v in sorted(parts.items())}, fingerprint, str(path)


def check_same_dataset(runs: list[dict]) -> None:
    """All runs were trained on one dataset: the same content fingerprint (paths differ once results move)."""
    by_fp: dict = {}
    for r in runs:
        if r.get("dataset_fingerprint"):
            by_fp.setdefault(r["dataset_fingerprint"], r)
    # runs of an older dgex record only the dataset's path
    fp_paths = {r.get("dataset") for r in runs if r.get("dataset_fingerprint")}
    by_path: dict = {}
    for r in runs:
        if not r.get("dataset_fingerprint") and r.get("dataset") and r["dataset"] not in fp_paths:
            by_path.setdefault(r["dataset"], r)
    groups = list(by_fp.values()) + list(by_path.values())
    if len(groups) > 1:
        a, b = groups[:2]
        raise InputError(
            f"runs come from different datasets: {a['dir']} was trained on {a.get('dataset')} and {b['dir']} on "
            f"{b.get('dataset')}, whose content differs (dataset fingerprints in run.json); aggregate the runs "
            f"of one dataset at a time"
        )


def find_gaps(runs: list[dict], sizes: dict | None) -> list[dict]:
    """Grid points whose runs do not cover every target part in ``sizes`` (``{part: n_targets}``).

    ``sizes`` None (dataset unknown, only with allow_incomplete): the parts any grid point has.
    Each gap: ``{layers, units, dropout, parts, missing_parts, n_genes, n_genes_expected}``.
    """
    by_point: dict[tuple, list[dict]] = {}
    for r in runs:
        by_point.setdefault((r["layers"], r["units"], r["dropout"]), []).append(r)
    if sizes is None:
        seen = {r["part"]: r["n_targets"] for r in runs if r["part"] is not None}
        sizes = dict(sorted(seen.items()))
    gaps = []
    for (layers, units, dropout), point in sorted(by_point.items()):
        parts = [r["part"] for r in point]
        name = f"{layers}x{units} dropout {dropout:g}"
        if None in parts:
            if len(parts) > 1:
                raise InputError(
                    f"grid point {name} has a run on all targets and part runs ({', '.join(r['dir'] for r in point)}); "
                    f"pass either the run on all targets or one run per part"
                )
            if sizes and point[0]["n_targets"] != sum(sizes.values()):
                raise InputError(
                    f"{point[0]['dir']}: run on all targets with {point[0]['n_targets']} targets, but the dataset "
                    f"has {sum(sizes.values())}; pass the dataset the runs were trained on"
                )
            continue  # one run on all targets covers every part
        for r in point:
            if r["part"] not in sizes or r["n_targets"] != sizes[r["part"]]:
                raise InputError(
                    f"{r['dir']}: run of target part {r['part']} with {r['n_targets']} targets, but the dataset has "
                    f"parts {sizes}; pass the dataset the runs were trained on"
                )
        missing = sorted(set(sizes) - set(parts))
        if missing:
            gaps.append(
                {
                    "layers": layers,
                    "units": units,
                    "dropout": dropout,
                    "parts": sorted(parts),
                    "missing_parts": missing,
                    "n_genes": sum(sizes[p] for p in parts),
                    "n_genes_expected": sum(sizes.values()),
                }
            )
    return gaps


def describe_gap(gap: dict) -> str:
    """``1x100 dropout 0.1 lacks target part 1 (12 of 20 genes)``."""
    missing = ", ".join(map(str, gap["missing_parts"]))
    return (
        f"{gap['layers']}x{gap['units']} dropout {gap['dropout']:g} lacks target part"
        f"{'s' * (len(gap['missing_parts']) > 1)} {missing} ({gap['n_genes']} of {gap['n_genes_expected']} genes)"
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


def aggregate(*, dgex_runs, baseline_runs, output_dir, dataset=None, allow_incomplete: bool = False) -> dict:
    """Collect runs into ``output_dir``; returns the content of ``aggregate.json``.

    ``dataset``: the processed dataset the runs were trained on (default: the
    one their run.json names), which says what target parts each grid point
    needs.  ``allow_incomplete``: aggregate grid points with missing parts (and
    leave out unfinished run folders) instead of refusing; they are listed in
    ``aggregate.json`` under ``incomplete``.
    """
    refuse_overwriting_inputs(
        [Path(output_dir) / f for f in AGGREGATE_FILES.values()],
        {
            "--dgex-runs": [Path(d) / f for d in dgex_runs or [] for f in ("run.json", "per_gene.csv", "history.csv")],
            "--baseline-runs": [Path(d) / f for d in baseline_runs or [] for f in ("run.json", "per_gene.csv")],
            "--dataset": dataset,
        },
        "--output-dir",
    )
    left_out = [str(d) for d in dgex_runs or [] if allow_incomplete and not (Path(d) / "run.json").is_file()]
    per_gene_d, histories, runs_d = _dgex_runs(dgex_runs or [], allow_incomplete)
    per_gene_b, runs_b = _baseline_runs(baseline_runs or [])
    runs = runs_d + runs_b
    if not runs:
        raise InputError("no runs given; pass --dgex-runs and/or --baseline-runs folders")
    check_same_dataset(runs)
    check_distinct(runs)
    gaps, sizes = [], None
    if runs_d:
        found = None
        try:
            found = expected_parts(runs, dataset)
        except InputError:
            if dataset is not None or not allow_incomplete:
                raise
            log.warning("the runs' dataset is not readable: gaps are judged by the parts the grid points have")
        if found is not None:
            sizes, fingerprint, path = found
            # every run (baselines too) must come from that dataset's content, wherever it lies now
            check_dataset({r["dir"]: r.get("dataset_fingerprint") for r in runs}, fingerprint, path)
        gaps = find_gaps(runs_d, sizes)
    if gaps and not allow_incomplete:
        listed = "; ".join(describe_gap(g) for g in gaps[:4]) + (f"; and {len(gaps) - 4} more" if len(gaps) > 4 else "")
        raise InputError(
            f"{len(gaps)} grid point{'s' * (len(gaps) > 1)} incomplete: {listed}; their part runs are missing "
            f"(failed, unfinished or deleted): train them (rerun the workflow) and aggregate again, or pass "
            f"--allow-incomplete to aggregate anyway (the tables then state the gaps)"
        )
    for g in gaps:
        log.warning("incomplete grid point (--allow-incomplete): %s", describe_gap(g))
    per_gene = pd.concat([f for f in (per_gene_d, per_gene_b) if not f.empty], ignore_index=True)[PER_GENE_AGG]
    check_coverage(per_gene, runs_d)
    out = Path(output_dir)
    with staged_files(out) as stage:  # all outputs or none
        with atomic_path(stage / "per_gene.csv.gz") as tmp:
            per_gene.to_csv(tmp, index=False, compression="gzip", float_format="%.6g")
        summary = summarise(per_gene)
        with atomic_path(stage / "summary.csv") as tmp:  # full precision: tables choose models by these means
            summary.to_csv(tmp, index=False, float_format="%.10g")
        with atomic_path(stage / "history.csv") as tmp:
            weighted_history(histories).to_csv(tmp, index=False, float_format="%.6g")
        with atomic_path(stage / "runs.csv") as tmp:
            runs_frame(runs).to_csv(tmp, index=False)
        dg = per_gene[per_gene["method"] == "D-GEX"]
        info = {
            "dataset": str(dataset)
            if dataset is not None
            else next((r["dataset"] for r in runs if r.get("dataset")), None),
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
            "target_parts": None if sizes is None else {str(k): v for k, v in sizes.items()},
            "incomplete": gaps,
        }
        if left_out:  # unfinished run folders that --allow-incomplete skipped (only then: the key stays optional)
            info["left_out"] = left_out
        write_json(stage / "aggregate.json", info)
    log.info("aggregated %d D-GEX and %d baseline runs into %s", len(runs_d), len(runs_b), out)
    return info


#: Columns each table of an aggregate folder must have for tables, figures and export (written by :func:`aggregate`).
REQUIRED_COLUMNS = {
    "per_gene": ("mae", "method", "split", "selected_by", *ARCH, "ensembl", "part", "overlap"),
    "summary": (*KEY, "n_genes", "mae_mean", "mae_std"),
    "history": (*ARCH, "epoch"),
    "runs": ("method", *ARCH, "part", "dir"),
}


def load_aggregate(path) -> dict:
    """Read an aggregate folder: ``{"per_gene", "summary", "history", "runs": DataFrame, "info": dict}``."""
    path = Path(path)
    files = AGGREGATE_FILES
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
    for key, columns in REQUIRED_COLUMNS.items():
        missing = [c for c in columns if c not in out[key].columns]
        if missing:
            raise InputError(
                f"{path / files[key]} lacks column(s) {', '.join(map(repr, missing))}: not what `dgex aggregate` "
                f"writes; rerun `dgex aggregate`"
            )
    if not isinstance(out["info"], dict):
        raise InputError(f"{path / files['info']}: not a JSON object; rerun `dgex aggregate`")
    return out
