"""Model bundles: one self-contained folder per trained model (D-GEX or linear), for inference on users' data.

``dgex export`` gathers the part runs of one grid point (one network per
target part) and the statistics of the processed dataset they were trained
on into a folder that ``dgex infer`` (or :func:`dgex.infer.predict` on
:func:`load_bundle`) needs nothing else to use.  Layout of a D-GEX bundle
(format version 1, ``kind`` ``dgex``)::

    bundle.json          format + version, dgex version, creation time, selection,
                         architecture, training config, per-part files/epochs/metrics,
                         overall metrics (gene-weighted over parts), sha256 of every file
    weights_part<k>.pt   {"state_dict", "shape": [n_in, n_out, layers, units], "dropout"}
                         (``weights_all.pt`` for a single network trained on all targets)
    landmarks.tsv        id, ensembl, entrez, symbol, probe        (L rows, network input order)
    targets.tsv          id, ensembl, entrez, symbol, probe, part  (T rows, output order: parts concatenated)
                         [+ any further per-target columns, carried into every inferred output]
    stats.npz            landmark_mean, landmark_std (L,); target_mean, target_std (T,): GEO statistics;
                         epsilon, standardize; gene_quantiles (L+T,): the dataset's GEO reference;
                         landmark_quantiles (L,): mean sorted GEO landmark profile (for --quantile-normalize);
                         probe_quantiles (P,) if GEO was quantile normalised in preprocess

Format versions.  A reader refuses any version it does not know (one line:
re-export, or use a newer dgex).  Format 2 adds a required ``kind``:
``dgex`` (as format 1) or ``linear``; format 1 knew no kind (a ``kind`` there
must be ``dgex``).  Each kind is written with the lowest version that
describes it (:data:`FORMAT_OF_KIND`), so D-GEX bundles stay readable by a
dgex that reads only format 1.  A linear bundle (``dgex export
--baseline-run``) holds, besides bundle.json (:data:`LINEAR_INFO_KEYS`, its
architecture :data:`LINEAR_ARCHITECTURE_KEYS`, no ``parts``) and the same
gene tables (``part`` ``all``) and stats.npz::

    linear.npz           weight (L, T), bias (T,) float: standardised landmarks z -> z @ weight + bias,
                         standardised targets (a baseline's coefficients_<selection>.npz)

Per-target reliability: targets.tsv may carry :data:`RELIABILITY_COLUMNS`
(``<mae|r|rho>_<split>``: each target's metrics on every split its model was
scored on, from the runs' per_gene.csv for the bundle's selection); they are
read as numbers (an empty cell is NaN), flow into every inferred output, and
:func:`well_inferred` flags targets by a criterion on them.

What a bundle must hold comes from the format, never from the bundle itself:
:func:`load_bundle` requires every key of :data:`INFO_KEYS`,
:data:`ARCHITECTURE_KEYS` and :data:`PART_KEYS` with its type, parts numbered
0..n-1 in order (or one ``null`` part) whose weights file, target range and
shape follow from the part number and the architecture, a checksum in
``files`` for every file of :func:`bundle_files` and no other entry there, the
arrays of :data:`STATS_ARRAYS` (finite, of the model's sizes), gene tables
whose ``part`` column matches each part's target range, and weights of the
declared shape (for a linear bundle: :data:`LINEAR_INFO_KEYS`, a checksum for
every file of :data:`TABLE_FILES` and :data:`LINEAR_FILE`, and finite weights
of the architecture's shape).  Any violation is one error naming the bundle, with the fix
"re-export it with `dgex export`".  Files in the folder that the format does
not name are ignored (never read; logged).  The checksums detect damaged or
modified files; they do not authenticate a bundle against someone who can
rewrite bundle.json too.

Gene tables: ``id`` is the neutral unique id of a gene (its Ensembl id in a
gene-level model, the probe id in the genome-wide model whose targets are
HG-U133A probes); Ensembl, Entrez, symbol and probe ids each have their own
column ('' where none).  Bundles exported before ``id`` existed (their unique
id in ``ensembl``, probe ids too) still load: :func:`dgex.genes.split_gene_ids`.
``bundle.json`` may carry ``training_data`` (what the networks were trained on,
:func:`training_data_record`); a bundle without it loads with that unknown.

Inputs are standardised as ``(x - mean) / (std + epsilon)`` and outputs
mapped back with ``y * (std + epsilon) + mean``, so both sides of the model
are on the GEO log2-expression scale.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from . import __version__
from .acquire import sha256_file
from .dataset import EVAL_SPLITS, ProcessedDataset
from .errors import ConfigError, InputError
from .genes import ALL_PROBES, clean_entrez, split_gene_ids
from .io import atomic_dir, refuse_overwriting_inputs, save_torch, write_json
from .metrics import read_per_gene
from .models import DGEX
from .runs import check_dataset, load_runs
from .settings import ExportSettings

log = logging.getLogger(__name__)

#: The newest bundle format this dgex reads and writes; it reads every version of :data:`FORMAT_OF_KIND`.
BUNDLE_FORMAT = 2
BUNDLE_KIND = "dgex-model-bundle"
#: Model kinds and the format version each is written with: the lowest that describes it, so a D-GEX
#: bundle stays readable by a dgex that reads only format 1 (which knew no ``kind``: every bundle was D-GEX).
FORMAT_OF_KIND = {"dgex": 1, "linear": 2}
#: Columns of landmarks.tsv and targets.tsv (targets.tsv may hold further per-target columns after these).
LANDMARK_COLUMNS = ["id", "ensembl", "entrez", "symbol", "probe"]
TARGET_COLUMNS = ["id", "ensembl", "entrez", "symbol", "probe", "part"]
#: Gene-table columns as CMap names them in GCTX row metadata (``pr_`` = row; ``ensembl_id`` as in CMap's geneinfo).
CMAP_NAMES = {"entrez": "pr_gene_id", "symbol": "pr_gene_symbol", "ensembl": "pr_ensembl_id", "probe": "pr_probe_id"}
#: Extensions that promise a file or an archive: a bundle folder is not named so.
FILE_SUFFIXES = {".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".pt", ".pth", ".ckpt", ".json", ".h5", ".gctx", ".csv"}


# --------------------------------------------------------------------------- #
# the format (version 1): what every bundle must hold, whatever its bundle.json lists
# --------------------------------------------------------------------------- #
#: The files of every bundle besides bundle.json and the weights (one file per part, :func:`bundle_files`).
TABLE_FILES = ("landmarks.tsv", "targets.tsv", "stats.npz")
#: The only hidden activation of format 1.
HIDDEN_ACTIVATION = "tanh"
#: The weights of a linear bundle: ``weight`` ``(L, T)``, ``bias`` ``(T,)`` in the standardised space.
LINEAR_FILE = "linear.npz"
#: Per-target reliability columns ``<metric>_<split>`` (split with ``_`` for ``-``), e.g. ``r_geo_te``.
RELIABILITY_METRICS = ("mae", "r", "rho")
#: Required keys (name -> kind, see ``_KINDS``) of bundle.json; other top-level keys are descriptive, never read.
INFO_KEYS = {
    "format": "string",
    "format_version": "count",
    "dgex_version": "string",
    "created": "string",
    "architecture": "object",
    "parts": "list",
    "files": "object",
}
#: ... of bundle.json from format 2 on (format 1: always ``dgex``).
KIND_KEYS = {"kind": "kind"}
#: What a linear bundle's bundle.json needs instead of ``parts`` and the D-GEX architecture.
LINEAR_INFO_KEYS = {k: v for k, v in INFO_KEYS.items() if k != "parts"}
LINEAR_ARCHITECTURE_KEYS = {"n_landmarks": "count", "n_targets": "count", "method": "string"}
#: ... of bundle.json's ``architecture``.
ARCHITECTURE_KEYS = {
    "n_landmarks": "count",
    "n_targets": "count",
    "layers": "count",
    "units": "count",
    "dropout": "rate",
    "hidden_activation": "string",
    "n_parts": "count",
}
#: ... of each entry of bundle.json's ``parts`` (other keys, e.g. metrics, are descriptive).
PART_KEYS = {"part": "part", "file": "string", "n_targets": "count", "target_start": "index", "shape": "shape"}
#: ... of each weights file.
WEIGHTS_KEYS = {"state_dict": "object", "shape": "shape", "dropout": "rate"}
#: Vectors of stats.npz every bundle has (besides the scalar ``epsilon``); other arrays are optional.
STATS_ARRAYS = ("landmark_mean", "landmark_std", "landmark_quantiles", "target_mean", "target_std")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: kind -> (test, what it is, for the error message)
_KINDS = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "list": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list"),
    "count": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "index": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "rate": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "part": (lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0 or null"),
    "kind": (lambda v: v in FORMAT_OF_KIND, "one of " + ", ".join(FORMAT_OF_KIND)),
    "shape": (
        lambda v: isinstance(v, list) and len(v) == 4 and all(_is_int(x) and x >= 1 for x in v),
        "a list of 4 integers >= 1",
    ),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _weights_name(part) -> str:
    return "weights_all.pt" if part is None else f"weights_part{int(part)}.pt"


def bundle_files(parts: list[dict]) -> list[str]:
    """The files (besides bundle.json) a bundle with these ``parts`` entries must hold, each with a checksum."""
    return [*TABLE_FILES, *(_weights_name(p["part"]) for p in parts)]


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
def runs_from_aggregate(aggregate_dir, selection: str = "geo-va") -> tuple[list[Path], dict]:
    """The part run folders of the grid point chosen on validation in an aggregate folder.

    ``selection`` geo-va picks the paper's GEO task choice (lowest GEO-va MAE,
    :func:`dgex.tables.choose` with task ``geo``), 1000g-va the cross-platform
    choice.  Returns ``(run_dirs, pick)``.
    """
    from .aggregate import load_aggregate
    from .tables import choose

    agg = load_aggregate(aggregate_dir)
    pick = choose(agg["summary"], "geo" if selection == "geo-va" else "cross")
    if pick is None:
        raise InputError(
            f"{aggregate_dir}: no D-GEX runs selected by {selection} in the aggregate; "
            f"aggregate trained D-GEX runs first or pass --runs"
        )
    runs = agg["runs"]
    sel = runs[
        (runs["method"] == "D-GEX")
        & (runs["layers"] == pick["layers"])
        & (runs["units"] == pick["units"])
        & np.isclose(runs["dropout"].astype(float), pick["dropout"])
    ]
    if sel.empty:
        raise InputError(
            f"{aggregate_dir}/runs.csv lists no run of the chosen grid point {pick['layers']}x"
            f"{pick['units']} dropout {pick['dropout']:g}; rerun `dgex aggregate`"
        )
    dirs = [Path(d) for d in sel["dir"]]
    log.info(
        "%s: %s chose %dx%d dropout %g (validation MAE %.4f): %s",
        aggregate_dir,
        selection,
        pick["layers"],
        pick["units"],
        pick["dropout"],
        pick["validation_mae"],
        ", ".join(map(str, dirs)),
    )
    return dirs, pick


def _check_parts(runs: list[dict], n_parts: int) -> None:
    """The runs (from :func:`dgex.runs.load_runs`) must be one run on all targets or one run per dataset part."""
    parts = [r["part"] for r in runs]
    if parts == [None]:
        return
    outside = [r for r in runs if not 0 <= r["part"] < n_parts]
    if outside:
        raise InputError(
            f"{outside[0]['dir']} was trained on target part {outside[0]['part']} but the dataset has "
            f"parts 0..{n_parts - 1}; use the dataset the runs were trained on"
        )
    missing = sorted(set(range(n_parts)) - set(parts))
    if missing:
        raise InputError(
            f"target part(s) {', '.join(map(str, missing))} missing: pass one run folder per part "
            f"(0..{n_parts - 1}) of the grid point"
        )


def _landmark_reference(
    dataset, mean: np.ndarray, std: np.ndarray, epsilon: float, chunk: int = 16384, progress: bool = False
) -> np.ndarray:
    """Mean sorted GEO landmark profile on the expression scale, ``(L,)``, streamed over the GEO splits.

    The dataset's ``gene_quantiles`` span landmarks *and* targets; inputs that
    hold only landmarks (L1000) are rank-mapped onto this landmark-only reference.
    """
    from tqdm.auto import tqdm

    total, n = np.zeros(len(mean)), 0
    with h5py.File(dataset, "r") as h5:
        splits = [h5[f"splits/{s}/X"] for s in ("geo-tr", "geo-va", "geo-te") if f"splits/{s}/X" in h5]
        with tqdm(
            total=sum(d.shape[0] for d in splits), unit="profile", desc="landmark reference", disable=not progress
        ) as bar:
            for ds in splits:
                for s in range(0, ds.shape[0], chunk):
                    x = ds[s : s + chunk].astype(np.float64) * (std + epsilon) + mean
                    total += np.sort(x, axis=1).sum(axis=0)
                    n += x.shape[0]
                    bar.update(x.shape[0])
    if n == 0:
        raise InputError(f"{dataset}: no GEO splits to build the landmark reference from; rerun `dgex preprocess`")
    return total / n


def _landmark_probes(ensembl: pd.Series) -> pd.Series:
    """The L1000 / HG-U133A probe of each landmark gene from the built-in D-GEX map ('' if not in it)."""
    from .genes import data_path, read_gene_map

    lm = read_gene_map(data_path("map_lm.txt"))
    first = lm.set_index("ensembl")["probes"].map(lambda p: p[0] if p else "")
    return ensembl.map(first).fillna("")


# --------------------------------------------------------------------------- #
# gene tables and what a bundle was trained on
# --------------------------------------------------------------------------- #
def cmap_gene_table(table: pd.DataFrame) -> pd.DataFrame:
    """A bundle gene table with CMap's row-metadata names (:data:`CMAP_NAMES`), ``id`` first, other columns kept."""
    out = table.rename(columns=CMAP_NAMES)
    first = ["id", *CMAP_NAMES.values()]
    return out[[c for c in first if c in out.columns] + [c for c in out.columns if c not in first]]


#: How a bundle exported before dgex recorded its training data describes it.
UNKNOWN_TRAINING = {
    "synthetic": None,
    "description": "unknown: the bundle was exported before dgex recorded what a model was trained on",
}


def _input_source(path: Path) -> str:
    """'synthetic' for a file written by `dgex demo-data` (named in the demo.json beside it), else 'file' / 'unknown'."""
    meta = path.parent / "demo.json"
    try:
        demo = json.loads(meta.read_text()) if meta.is_file() else None
    except (OSError, ValueError):
        demo = None
    by_demo = isinstance(demo, dict) and demo.get("generator") == "dgex.demo.generate"
    if by_demo and path.name in (demo.get("files") or {}).values():
        return "synthetic"
    return "file" if path.exists() else "unknown"


def training_data_record(dataset, params: dict) -> dict:
    """What the networks of a bundle were trained on, for bundle.json's ``training_data``.

    ``params``: the processed dataset's recorded preprocess parameters.  Each
    raw input (GEO training data, 1000G, GTEx) is ``synthetic`` when written by
    `dgex demo-data` (the demo.json beside it names it), ``file`` when it exists
    and is not, ``unknown`` when it is no longer there; ``synthetic`` is the
    GEO training input's verdict (``None``: cannot tell).
    """
    inputs = {
        role: {"path": str(params[role]), "source": _input_source(Path(str(params[role])))}
        for role in ("geo", "g1000", "gtex")
        if params.get(role)
    }
    geo = inputs.get("geo", {}).get("source", "unknown")
    synthetic = {"synthetic": True, "file": False}.get(geo)
    if synthetic:
        text = "synthetic demo data generated by `dgex demo-data`: its predictions mean nothing for real samples"
    elif synthetic is False:
        text = f"GEO expression profiles from {inputs['geo']['path']}"
    else:
        text = "unknown: the GEO input the dataset was built from is no longer where preprocess read it"
    return {
        "synthetic": synthetic,
        "description": text,
        "dataset": str(dataset),
        "landmarks": str(params.get("landmarks", "")),
        "targets": str(params.get("targets", "")),
        "inputs": inputs,
    }


def _weighted_metrics(parts: list[dict]) -> dict:
    """Overall MAE per split over all targets: the parts' MAEs weighted by their gene counts."""
    out = {}
    for split in EVAL_SPLITS:
        vals = [(p["metrics"].get(split), p["n_targets"]) for p in parts]
        if all(v is not None for v, _ in vals):
            out[split] = float(sum(v * n for v, n in vals) / sum(n for _, n in vals))
    return out


def _read_dataset(dataset) -> dict:
    """What every bundle takes from the processed dataset: genes, GEO statistics, references, parameters."""
    with ProcessedDataset(dataset) as ds:
        return {
            "genes": ds.genes(),
            "stats": ds.stats("geo"),
            "epsilon": float(ds.attrs.get("epsilon", 1e-3)),
            "standardize": str(ds.attrs.get("standardize", "")),
            "gene_quantiles": ds.reference("gene_quantiles"),
            "probe_quantiles": ds.reference("probe_quantiles") if ds.has_reference("probe_quantiles") else None,
            "params": ds.params,
            "fingerprint": ds.fingerprint(),
        }


def _bundle_tables(dataset, d: dict, tg_index: np.ndarray, progress: bool) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Gene tables and ``stats.npz`` arrays of a bundle whose outputs are the dataset's targets ``tg_index``."""
    genes, (mean, std), epsilon = d["genes"], d["stats"], d["epsilon"]
    L = len(genes.landmarks)
    lm = genes.landmarks[["ensembl", "entrez", "symbol"]].copy()
    lm["probe"] = _landmark_probes(lm["ensembl"]).values
    lm = split_gene_ids(lm, probe_ids=False)
    tg = genes.targets.iloc[tg_index][["ensembl", "entrez", "symbol", "part"]].copy()
    tg = split_gene_ids(tg, probe_ids=str(d["params"].get("targets")) == ALL_PROBES)
    stats = {
        "landmark_mean": mean[:L],
        "landmark_std": std[:L],
        "target_mean": mean[L:][tg_index],
        "target_std": std[L:][tg_index],
        "epsilon": epsilon,
        "standardize": d["standardize"],
        "gene_quantiles": d["gene_quantiles"],
        "landmark_quantiles": _landmark_reference(dataset, mean[:L], std[:L], epsilon, progress=progress),
    }
    if d["probe_quantiles"] is not None:
        stats["probe_quantiles"] = d["probe_quantiles"]
    return lm, tg, stats


def _dataset_record(dataset, d: dict) -> dict:
    """bundle.json's ``dataset`` and ``training_data`` entries."""
    genes = d["genes"]
    return {
        "training_data": training_data_record(dataset, d["params"]),
        "dataset": {
            "path": str(dataset),
            "standardize": d["standardize"],
            "epsilon": d["epsilon"],
            "n_landmarks": len(genes.landmarks),
            "n_targets": int(len(genes.targets)),
            "params": d["params"],
        },
    }


# --------------------------------------------------------------------------- #
# per-target reliability: each target's metrics on the evaluation splits, from the runs' per_gene.csv
# --------------------------------------------------------------------------- #
def reliability_column(metric: str, split: str) -> str:
    """Name of a reliability column of targets.tsv: ``r`` on ``geo-te`` -> ``r_geo_te``."""
    return f"{metric}_{split.replace('-', '_')}"


#: Every reliability column a bundle may carry, in order (splits, then metrics within a split).
RELIABILITY_COLUMNS = [reliability_column(m, s) for s in EVAL_SPLITS for m in RELIABILITY_METRICS]


def reliability_table(per_gene: pd.DataFrame, selection: str, ids: pd.Series, source) -> pd.DataFrame:
    """Reliability columns ``(n_targets, 3 x n_splits)`` for the targets ``ids`` (the dataset's target ids).

    ``per_gene``: rows of :data:`dgex.metrics.PER_GENE_COLUMNS` (one model);
    the rows selected by ``selection`` give each target's MAE (standardised
    units), Pearson r and Spearman rho on every split they were scored on.
    """
    rows = per_gene[per_gene["selected_by"] == selection]
    if rows.duplicated(["ensembl", "split"]).any():
        raise InputError(f"{source}: per_gene.csv scores a gene twice on one split for {selection}; rerun that stage")
    wide = rows.pivot(index="ensembl", columns="split", values=list(RELIABILITY_METRICS))
    splits = [s for s in EVAL_SPLITS if s in set(rows["split"])]
    missing = ~pd.Index(ids).isin(wide.index)
    if missing.any() or not splits:
        raise InputError(
            f"{source}: per_gene.csv has no {selection} scores for {int(missing.sum()) or len(ids)} target(s) "
            f"(e.g. {ids[missing].iloc[0] if missing.any() else 'all'}); rerun the runs with this dataset"
        )
    table = wide.reindex(pd.Index(ids))
    out = {
        reliability_column(m, s): table[(m, s)].to_numpy(dtype=np.float64) for s in splits for m in RELIABILITY_METRICS
    }
    return pd.DataFrame(out)


def _with_reliability(tg: pd.DataFrame, per_gene: pd.DataFrame, selection: str, source) -> pd.DataFrame:
    """``tg`` (ids of the dataset's targets in ``id``) with its reliability columns appended."""
    rel = reliability_table(per_gene, selection, tg["id"].reset_index(drop=True), source)
    return pd.concat([tg.reset_index(drop=True), rel], axis=1)


def _mean_mae(tg: pd.DataFrame) -> dict:
    """Overall MAE per split (mean over targets, standardised units) from the reliability columns."""
    return {s: float(tg[c].mean()) for s in EVAL_SPLITS if (c := reliability_column("mae", s)) in tg.columns}


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
def export_bundle(
    *,
    dataset,
    output,
    runs=None,
    grid_aggregate=None,
    baseline_run=None,
    selection: str = "geo-va",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a model bundle; returns ``bundle.json``'s content.

    Give one of ``runs`` (the part run folders of one D-GEX grid point),
    ``grid_aggregate`` (an aggregate folder: its validation-chosen grid point
    is exported) or ``baseline_run`` (a ``dgex baseline`` folder: its linear
    model chosen by ``selection`` becomes a linear bundle).
    """
    ExportSettings.check(locals())
    from .checkpoints import load_weights

    if sum(bool(v) for v in (runs, grid_aggregate, baseline_run)) != 1:
        raise InputError(
            "pass one of --runs (the part run folders of one grid point), --grid-aggregate or --baseline-run"
        )
    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    if baseline_run:
        return _export_linear(dataset, output, Path(baseline_run), selection, overwrite, progress)
    pick = None
    if grid_aggregate:
        runs, pick = runs_from_aggregate(grid_aggregate, selection)
    # the bundle folder is replaced as a whole (--overwrite): it must not be, or hold, what it is made from
    refuse_overwriting_inputs([output], {"--dataset": dataset, "--runs": runs, "--grid-aggregate": grid_aggregate})
    run_list = load_runs(runs, selection)

    d = _read_dataset(dataset)
    genes, fingerprint = d["genes"], d["fingerprint"]
    L = len(genes.landmarks)
    _check_parts(run_list, genes.n_parts)

    landmark_ids = genes.landmarks["ensembl"].tolist()
    tg_parts = genes.targets["part"].to_numpy()
    networks, part_info, target_idx = [], [], []
    for run in run_list:  # sorted by part: the output order
        part = run["part"]
        idx = np.arange(len(tg_parts)) if part is None else np.flatnonzero(tg_parts == part)
        gene_ids = {"landmarks": landmark_ids, "targets": genes.targets["ensembl"].iloc[idx].tolist()}
        model, blob = load_weights(run["checkpoint"], n_in=L, n_out=len(idx), gene_ids=gene_ids)
        row = blob.get("metrics", {})
        networks.append((part, model))
        part_info.append(
            {
                "epoch": int(blob.get("epoch", 0)),
                "run_dir": str(run["dir"]),
                "metrics": {s: float(row[s]) for s in EVAL_SPLITS if row.get(s) is not None},
                "best": run["info"].get("best", {}),
            }
        )
        target_idx.append(idx)
    tg_index = np.concatenate(target_idx)
    # same genes are not enough: the bundle's statistics and reference come from this dataset
    check_dataset({str(r["dir"]): r["info"].get("dataset_fingerprint") for r in run_list}, fingerprint, dataset)

    lm, tg, stats = _bundle_tables(dataset, d, tg_index, progress)
    per_gene = pd.concat([read_per_gene(Path(r["dir"]) / "per_gene.csv") for r in run_list], ignore_index=True)
    tg = _with_reliability(tg, per_gene, selection, ", ".join(str(r["dir"]) for r in run_list))
    cfg = dict(run_list[0]["config"])
    cfg.pop("part", None)
    for p, n in zip(part_info, target_idx):
        p["n_targets"] = len(n)
    info = write_bundle(
        output,
        networks=networks,
        landmarks=lm,
        targets=tg,
        stats=stats,
        overwrite=overwrite,
        part_info=part_info,
        extra={
            "selection": selection,
            "training": cfg,
            "grid_choice": pick,
            "metrics": _weighted_metrics(part_info),
            **_dataset_record(dataset, d),
        },
    )
    arch = info["architecture"]
    log.info(
        "exported %d network(s) (%dx%d, %d landmarks -> %d targets, selected by %s) to %s",
        len(networks),
        arch["layers"],
        arch["units"],
        L,
        len(tg_index),
        selection,
        output,
    )
    return info


def _export_linear(dataset, output: Path, run_dir: Path, selection: str, overwrite: bool, progress: bool) -> dict:
    """A linear bundle from the model a ``dgex baseline`` run chose by ``selection`` (its coefficients file)."""
    from .baselines import coefficients_name, load_coefficients

    refuse_overwriting_inputs([output], {"--dataset": dataset, "--baseline-run": run_dir})
    meta = run_dir / "run.json"
    try:
        run = json.loads(meta.read_text())
    except FileNotFoundError:
        raise InputError(f"{meta} not found: pass a finished `dgex baseline` output folder as --baseline-run") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta}: unreadable ({exc}); rerun `dgex baseline`") from None
    task = run.get("tasks", {}).get(selection) if isinstance(run, dict) else None
    if task is None:
        raise InputError(
            f"{run_dir}: the baseline chose no model by {selection} (the dataset had no such split); "
            f"pass --selection geo-va"
        )
    W, b, value = load_coefficients(run_dir / coefficients_name(selection))
    d = _read_dataset(dataset)
    check_dataset({str(run_dir): run.get("dataset_fingerprint")}, d["fingerprint"], dataset)
    genes = d["genes"]
    L, T = len(genes.landmarks), len(genes.targets)
    if W.shape != (L, T):
        raise InputError(
            f"{run_dir / coefficients_name(selection)} maps {W.shape[0]} landmarks -> {W.shape[1]} targets but "
            f"{dataset} has {L} -> {T}; pass the dataset the baseline was run on"
        )
    lm, tg, stats = _bundle_tables(dataset, d, np.arange(T), progress)
    tg = _with_reliability(tg, read_per_gene(run_dir / "per_gene.csv"), selection, run_dir)
    model = {
        "method": str(run.get("method")),
        "method_key": str(run.get("method_key")),
        "hyper_parameter": run.get("hyper_parameter"),
        "value": None if np.isnan(value) else value,
        "penalty_convention": run.get("penalty_convention"),
        "run_dir": str(run_dir),
        "n_train": run.get("n_train"),
    }
    info = write_linear_bundle(
        output,
        weight=W,
        bias=b,
        method=model["method"],
        landmarks=lm,
        targets=tg,
        stats=stats,
        overwrite=overwrite,
        extra={"selection": selection, "model": model, "metrics": _mean_mae(tg), **_dataset_record(dataset, d)},
    )
    log.info("exported %s to %s", model_description(info), output)
    return info


def prefer_model(*, bundles, output) -> dict:
    """Write which of ``bundles`` validation prefers to the JSON file ``output``; returns its content.

    The criterion is the one that chose each model: the overall validation
    MAE on the bundles' common selection split (mean over target genes of the
    per-gene MAE, standardised units, from each bundle's reliability columns).
    The lowest wins; a tie goes to the first bundle listed.
    """
    output = Path(output)
    refuse_overwriting_inputs([output], {"--bundles": bundles})
    loaded = [load_bundle(b) for b in bundles]
    selections = {str(b.info.get("selection")) for b in loaded}
    if len(selections) != 1:
        raise InputError(
            f"the bundles were selected on different splits ({', '.join(sorted(selections))}); "
            f"compare bundles exported with the same --selection"
        )
    selection = selections.pop()
    column = reliability_column("mae", selection)
    lacking = [str(b.path) for b in loaded if column not in b.targets.columns]
    if lacking:
        raise InputError(f"{lacking[0]}: no per-target {selection} MAE (exported by an older dgex); re-export it")
    candidates = [
        {
            "bundle": str(b.path),
            "kind": b.kind,
            "model": model_description(b.info),
            "validation_mae": float(b.targets[column].mean()),
        }
        for b in loaded
    ]
    best = min(range(len(candidates)), key=lambda i: (candidates[i]["validation_mae"], i))
    result = {
        "selection": selection,
        "criterion": f"lowest overall MAE on {selection}: mean over target genes of the per-gene MAE "
        f"(standardised units), the validation error each model was chosen by",
        "preferred": candidates[best]["bundle"],
        "preferred_kind": candidates[best]["kind"],
        "candidates": candidates,
    }
    write_json(output, result)
    log.info(
        "%s prefers %s (%s, validation MAE %.4f)",
        selection,
        result["preferred"],
        candidates[best]["model"],
        candidates[best]["validation_mae"],
    )
    return result


def _check_output(output: Path, overwrite: bool) -> None:
    if output.suffix.lower() in FILE_SUFFIXES:
        raise ConfigError(
            f"{output}: a model bundle is a folder, but the name ends in {output.suffix} like a file or archive; "
            f"name it without that extension (e.g. {output.with_suffix('').name})"
        )
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it or choose another --output")


def _write_tables(tmp: Path, landmarks: pd.DataFrame, targets: pd.DataFrame, stats: dict, single: bool) -> None:
    """landmarks.tsv, targets.tsv (``single``: one model for all targets, part ``all``) and stats.npz into ``tmp``."""
    lm = split_gene_ids(landmarks, probe_ids=False)
    lm[LANDMARK_COLUMNS].to_csv(tmp / "landmarks.tsv", sep="\t", index=False)
    tg = split_gene_ids(targets)
    if single:
        tg["part"] = "all"
    # per-target columns beyond the format's (e.g. reliability metrics) follow it: outputs carry them all
    extra_cols = [c for c in tg.columns if c not in TARGET_COLUMNS]
    tg[TARGET_COLUMNS + extra_cols].to_csv(tmp / "targets.tsv", sep="\t", index=False)
    arrays = {k: np.asarray(v) for k, v in stats.items()}
    arrays["epsilon"] = np.float64(stats["epsilon"])
    np.savez(tmp / "stats.npz", **arrays)


def _header(kind: str) -> dict:
    """The first keys of bundle.json: format, version (:data:`FORMAT_OF_KIND`), kind, versions, time."""
    return {
        "format": BUNDLE_KIND,
        "format_version": FORMAT_OF_KIND[kind],
        "kind": kind,
        "dgex_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _checksums(tmp: Path) -> dict:
    return {f: sha256_file(tmp / f) for f in sorted(p.name for p in tmp.iterdir())}


def write_linear_bundle(
    output,
    *,
    weight: np.ndarray,
    bias: np.ndarray,
    method: str,
    landmarks: pd.DataFrame,
    targets: pd.DataFrame,
    stats: dict,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a linear bundle (format 2, kind ``linear``) atomically; returns ``bundle.json``'s content.

    ``weight`` ``(L, T)`` and ``bias`` ``(T,)`` map standardised landmarks to
    standardised targets (``yhat = z @ weight + bias``, the space of
    ``dgex baseline``'s coefficients); the gene tables and ``stats`` are as
    for :func:`write_bundle`; ``method`` names the model (e.g. ``LR-L2``).
    """
    output = Path(output)
    _check_output(output, overwrite)
    weight, bias = np.asarray(weight, dtype=np.float32), np.asarray(bias, dtype=np.float32)
    with atomic_dir(output, overwrite) as tmp:
        with open(tmp / LINEAR_FILE, "wb") as fh:
            np.savez(fh, weight=weight, bias=bias)
        _write_tables(tmp, landmarks, targets, stats, single=True)
        info = {
            **_header("linear"),
            "architecture": {"n_landmarks": weight.shape[0], "n_targets": weight.shape[1], "method": method},
            **(extra or {}),
            "files": _checksums(tmp),
        }
        write_json(tmp / "bundle.json", info)
    return info


def write_bundle(
    output,
    *,
    networks: list,
    landmarks: pd.DataFrame,
    targets: pd.DataFrame,
    stats: dict,
    part_info: list[dict] | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a bundle folder atomically (temporary folder renamed into place); returns ``bundle.json``'s content.

    ``networks``: ``[(part, DGEX)]`` in output order (part ``None`` = one network
    for all targets); ``landmarks`` (L rows: :data:`LANDMARK_COLUMNS`) and
    ``targets`` (T rows: :data:`TARGET_COLUMNS`, then any further per-target
    columns, written as they are) in network order; tables without ``id`` are
    completed by :func:`dgex.genes.split_gene_ids`;
    ``stats``: the arrays of ``stats.npz`` (see the module docstring);
    ``part_info``: extra per-part fields; ``extra``: extra top-level fields.
    """
    output = Path(output)
    _check_output(output, overwrite)
    with atomic_dir(output, overwrite) as tmp:
        parts, start = [], 0
        for k, (part, model) in enumerate(networks):
            name = _weights_name(part)
            shape = [model.n_in, model.n_out, model.n_layers, model.n_units]
            save_torch(
                {
                    "state_dict": {key: v.detach().cpu() for key, v in model.state_dict().items()},
                    "shape": shape,
                    "dropout": float(model.dropout_rate),
                },
                tmp / name,
                atomic=False,
            )
            parts.append(
                {
                    "part": part,
                    "file": name,
                    "n_targets": model.n_out,
                    "target_start": start,
                    "shape": shape,
                    **(part_info[k] if part_info else {}),
                }
            )
            start += model.n_out
        _write_tables(tmp, landmarks, targets, stats, single=[p for p, _ in networks] == [None])
        first = parts[0]["shape"]
        info = {
            **_header("dgex"),
            "architecture": {
                "n_landmarks": first[0],
                "n_targets": start,
                "layers": first[2],
                "units": first[3],
                "dropout": float(networks[0][1].dropout_rate),
                "hidden_activation": "tanh",
                "n_parts": len(parts),
            },
            **(extra or {}),
            "parts": parts,
            "files": _checksums(tmp),
        }
        write_json(tmp / "bundle.json", info)
    return info


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
def model_description(info: dict) -> str:
    """The model of a (checked) bundle.json in words: D-GEX architecture, or linear method and hyper-parameter."""
    arch = info["architecture"]
    sizes = f"{arch['n_landmarks']} landmarks -> {arch['n_targets']} targets"
    if info.get("kind", "dgex") == "linear":
        model = info.get("model") if isinstance(info.get("model"), dict) else {}
        param, value = model.get("hyper_parameter"), model.get("value")
        chosen = f" {param} = {value:g}" if param and isinstance(value, (int, float)) else ""
        return f"{arch['method']} linear model{chosen}, {sizes}"
    return (
        f"D-GEX {arch['layers']}x{arch['units']} {arch['hidden_activation']}, dropout {arch['dropout']:g}, "
        f"{arch['n_parts']} part(s), {sizes}"
    )


class LinearMap(torch.nn.Module):
    """A linear bundle's model ``z @ weight + bias`` shaped like :class:`~dgex.models.DGEX` without hidden layers.

    :meth:`Bundle.to` folds the target statistics into ``output`` as for a
    network, and :meth:`Bundle.predict_tensor` runs it the same way.
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.n_in, self.n_out = weight.shape
        self.n_layers, self.n_units, self.dropout_rate = 0, 0, 0.0
        self.hidden = torch.nn.ModuleList()
        self.output = torch.nn.Linear(self.n_in, self.n_out)
        with torch.no_grad():
            self.output.weight.copy_(torch.as_tensor(np.ascontiguousarray(weight.T), dtype=torch.float32))
            self.output.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor, buffers=None) -> torch.Tensor:
        """Standardised targets ``(n_samples, n_targets)`` from standardised landmarks ``(n_samples, n_landmarks)``."""
        return self.output(x)


def parse_criterion(text: str) -> tuple[str, str, float] | None:
    """``"r_geo_te>=0.5"`` -> ``("r_geo_te", ">=", 0.5)``; ``"none"`` -> None.  Errors name the fix."""
    if text.strip().lower() == "none":
        return None
    m = re.fullmatch(r"\s*([a-z0-9_]+)\s*(>=|<=)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*", text)
    if not m or m.group(1) not in RELIABILITY_COLUMNS:
        raise ConfigError(
            f"--well-inferred {text!r}: give <column> >= or <= <number> with a reliability column "
            f"({', '.join(RELIABILITY_COLUMNS[:3])}, ... e.g. r_geo_te>=0.5), or none"
        )
    return m.group(1), m.group(2), float(m.group(3))


def well_inferred(table: pd.DataFrame, criterion: str) -> np.ndarray | None:
    """``well_inferred`` flags ``(n_rows,)`` int8 of a per-target table by ``criterion`` (:func:`parse_criterion`).

    1 where the row's value passes, 0 where it fails or is missing (e.g. a
    measured landmark row).  None when there is no criterion or the table has
    no reliability columns at all (a bundle exported before they existed).
    """
    parsed = parse_criterion(criterion)
    if parsed is None or not any(c in table.columns for c in RELIABILITY_COLUMNS):
        return None
    column, op, threshold = parsed
    if column not in table.columns:
        have = [c for c in RELIABILITY_COLUMNS if c in table.columns]
        raise ConfigError(
            f"--well-inferred {criterion!r}: the model was not scored on that split; choose one of {', '.join(have)}"
        )
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        passed = values >= threshold if op == ">=" else values <= threshold
    return passed.astype(np.int8)


@dataclass
class Bundle:
    """A loaded model bundle.

    ``landmarks`` (L rows) and ``targets`` (T rows) are the input and output
    gene tables in network order; ``networks[i]`` predicts the targets
    ``part_slices[i]``.  Statistics live as float32 tensors on ``device``.
    """

    path: Path
    info: dict
    landmarks: pd.DataFrame
    targets: pd.DataFrame
    stats: dict
    networks: list
    part_slices: list
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n_landmarks(self) -> int:
        """Number of landmark genes the networks take as input."""
        return len(self.landmarks)

    @property
    def n_targets(self) -> int:
        """Number of target genes the networks predict, all parts together."""
        return len(self.targets)

    @property
    def epsilon(self) -> float:
        """The standardisation floor added to every gene's standard deviation."""
        return float(self.stats["epsilon"])

    @property
    def kind(self) -> str:
        """``dgex`` or ``linear`` (a format-1 bundle is D-GEX)."""
        return str(self.info.get("kind", "dgex"))

    def describe(self) -> str:
        """One line: which model this is and how it was chosen, e.g. for ``dgex infer``'s log."""
        mae = self.info.get("metrics", {}).get(self.info.get("selection"))
        chosen = f", validation MAE {mae:.4f}" if isinstance(mae, (int, float)) else ""
        return (
            f"kind {self.kind}: {model_description(self.info)}; selected by {self.info.get('selection', 'unknown')}"
            f"{chosen}; per-target reliability: {', '.join(self.reliability_columns) or 'none'}"
        )

    @property
    def reliability_columns(self) -> list[str]:
        """The reliability columns (:data:`RELIABILITY_COLUMNS`) this bundle's targets carry."""
        return [c for c in RELIABILITY_COLUMNS if c in self.targets.columns]

    @property
    def target_table(self) -> pd.DataFrame:
        """The per-target table ``(n_targets, n_columns)`` in output order, with CMap's column names.

        ``id`` (the neutral unique id), ``pr_gene_id`` (Entrez), ``pr_gene_symbol``,
        ``pr_ensembl_id``, ``pr_probe_id``, ``part``, then every further column of
        targets.tsv: inferred outputs carry all of its columns as row metadata.
        """
        return cmap_gene_table(self.targets).reset_index(drop=True)

    @property
    def landmark_table(self) -> pd.DataFrame:
        """The landmark table ``(n_landmarks, n_columns)`` in input order, named as :attr:`target_table`."""
        return cmap_gene_table(self.landmarks).reset_index(drop=True)

    @property
    def training_data(self) -> dict:
        """bundle.json's ``training_data`` (:func:`training_data_record`); :data:`UNKNOWN_TRAINING` if absent."""
        record = self.info.get("training_data")
        return dict(record) if isinstance(record, dict) and "synthetic" in record else dict(UNKNOWN_TRAINING)

    @property
    def bundle_id(self) -> str:
        """A content id of the model: the first 16 hex digits of the sha256 of its files' checksums (sorted)."""
        import hashlib

        files = json.dumps(sorted(self.info["files"].items()))
        return hashlib.sha256(files.encode()).hexdigest()[:16]

    def provenance(self) -> dict:
        """Where predictions of this bundle come from: a flat dict of strings, for every inferred output.

        Keys: bundle path, id and bundle.json sha256, selection, model kind and
        architecture, the bundle's dgex version and creation time, and the
        training data (``training_synthetic``: yes / no / unknown, ``training_data``).
        """
        training = self.training_data
        synthetic = training.get("synthetic")
        return {
            "bundle": str(self.path),
            "bundle_id": self.bundle_id,
            "bundle_sha256": sha256_file(self.path / "bundle.json"),
            "selection": str(self.info.get("selection", "unknown")),
            "model": model_description(self.info),
            "bundle_dgex_version": str(self.info.get("dgex_version")),
            "bundle_created": str(self.info.get("created")),
            "training_synthetic": {True: "yes", False: "no"}.get(synthetic, "unknown"),
            "training_data": str(training.get("description", "")),
        }

    def to(self, device) -> Bundle:
        """Move the networks and statistics tensors to ``device``; returns self."""
        self.device = torch.device(device)
        for net in self.networks:
            net.to(self.device)
        eps = self.epsilon
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)  # noqa: E731
        self._lm_mean = as_t(self.stats["landmark_mean"])
        self._lm_scale = as_t(np.asarray(self.stats["landmark_std"], dtype=np.float64) + eps)
        self._tg_mean = as_t(self.stats["target_mean"])
        tg_mean = np.asarray(self.stats["target_mean"], dtype=np.float64)
        tg_scale = np.asarray(self.stats["target_std"], dtype=np.float64) + eps
        # the inverse target standardisation folded into a copy of each network's output layer
        # (y = (W s) h + (b s + m)): one pass over the output instead of three
        self._predictors = []
        for net, sl in zip(self.networks, self.part_slices):
            w = net.output.weight.detach().double().cpu().numpy() * tg_scale[sl, None]
            b = net.output.bias.detach().double().cpu().numpy() * tg_scale[sl] + tg_mean[sl]
            folded = copy.deepcopy(net).eval()
            with torch.no_grad():
                folded.output.weight.copy_(as_t(w))
                folded.output.bias.copy_(as_t(b))
            self._predictors.append(folded)
        self._workspace: dict = {}
        return self

    def _buffers(self, n: int) -> dict:
        """Reused per-batch-size activations (fresh allocations page-fault on every batch)."""
        ws = self._workspace.get(n)
        if ws is None:
            if len(self._workspace) >= 2:
                self._workspace.clear()
            kw = dict(dtype=torch.float32, device=self.device)
            ws = {
                "z": torch.empty((n, self.n_landmarks), **kw),
                "h": [torch.empty((n, layer.out_features), **kw) for layer in self.networks[0].hidden]
                if len({net.n_units for net in self.networks}) == 1
                else None,
            }
            self._workspace[n] = ws
        return ws

    @torch.inference_mode()
    def predict_tensor(
        self, x: torch.Tensor, present: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Targets on the expression scale ``(n, T)`` from landmark expression on ``self.device``.

        ``x`` is ``(n, L)``, or ``(n, k)`` with ``present`` the ``(k,)`` landmark
        indices it holds; absent landmarks get the GEO mean (0 after
        standardisation).  ``out``: an ``(n, T)`` float32 tensor to fill.
        The networks' own forward runs in eval mode (no dropout), its hidden activations into reused buffers.
        """
        n = x.shape[0]
        ws = self._buffers(n)
        z = ws["z"]
        if present is None:
            torch.sub(x, self._lm_mean, out=z).div_(self._lm_scale)
        else:
            z.zero_()
            z[:, present] = (x - self._lm_mean[present]) / self._lm_scale[present]
        if out is None:
            out = torch.empty((n, self.n_targets), dtype=torch.float32, device=self.device)
        for net, sl in zip(self._predictors, self.part_slices):
            out[:, sl] = net(z, buffers=ws["h"])
        return out


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(f"{path}: corrupt model bundle ({what}); re-export it with `dgex export`")


def _disagree(path: Path, what: str) -> InputError:
    return InputError(f"{path}: bundle files disagree: {what}; re-export it with `dgex export`")


def _read_info(path: Path) -> dict:
    """bundle.json of the folder ``path``, checked to be a dgex bundle of a format version this dgex reads."""
    meta = path / "bundle.json"
    if not path.is_dir() or not meta.is_file():
        raise InputError(f"{path}: not a dgex model bundle (no bundle.json); pass a folder written by `dgex export`")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"bundle.json unreadable: {exc}") from None
    except OSError as exc:
        raise _corrupt(path, f"cannot read bundle.json: {exc.strerror}") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_KIND:
        kind = info.get("format") if isinstance(info, dict) else None
        raise InputError(
            f"{path}: bundle.json is not a dgex model bundle description (format {kind!r}, expected "
            f"{BUNDLE_KIND!r}); pass a folder written by `dgex export`"
        )
    version = info.get("format_version")
    readable = sorted(set(FORMAT_OF_KIND.values()))
    if type(version) is not int or version not in readable:  # True == 1 and 1.0 == 1 in Python
        raise InputError(
            f"{path}: bundle format version {version!r} (written by dgex "
            f"{info.get('dgex_version')}), this dgex {__version__} reads versions "
            f"{', '.join(map(str, readable))}; re-export the model with `dgex export` of this version"
        )
    return info


def _bundle_kind(path: Path, info: dict) -> str:
    """The model kind: required from format 2 on; format 1 knew only D-GEX (a ``kind`` there must say so)."""
    version = info["format_version"]
    if version >= 2:
        _check_keys(path, f"bundle.json (format version {version})", info, KIND_KEYS)
        return info["kind"]
    if info.get("kind", "dgex") != "dgex":
        raise _corrupt(path, f"kind {json.dumps(info['kind'])[:40]} in a format 1 bundle, which holds only D-GEX")
    return "dgex"


def _check_linear_info(path: Path, info: dict) -> tuple[dict, list, dict]:
    """bundle.json of a linear bundle; returns ``(architecture, parts, files)`` with one implied part (all targets)."""
    _check_keys(path, "bundle.json", info, LINEAR_INFO_KEYS)
    arch, files = info["architecture"], info["files"]
    _check_keys(path, "bundle.json architecture", arch, LINEAR_ARCHITECTURE_KEYS)
    if not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values()):
        raise _corrupt(path, "bundle.json files holds a value that is not a sha256 hex digest")
    return arch, [{"part": None, "file": LINEAR_FILE, "n_targets": arch["n_targets"], "target_start": 0}], files


def _read_linear(path: Path, arch: dict) -> LinearMap:
    """linear.npz, checked against the architecture: finite ``weight`` ``(L, T)`` and ``bias`` ``(T,)``."""
    L, T = arch["n_landmarks"], arch["n_targets"]
    try:
        with np.load(path / LINEAR_FILE, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, f"{LINEAR_FILE} unreadable: {exc}") from None
    missing = [k for k in ("weight", "bias") if k not in arrays]
    if missing:
        raise _corrupt(path, f"{LINEAR_FILE} lacks {', '.join(missing)}")
    weight, bias = arrays["weight"], arrays["bias"]
    if weight.shape != (L, T) or bias.shape != (T,):
        raise _disagree(
            path,
            f"{LINEAR_FILE} holds weight {weight.shape} and bias {bias.shape}; the model maps {L} landmarks -> {T} targets",
        )
    if (
        weight.dtype.kind != "f"
        or bias.dtype.kind != "f"
        or not (np.isfinite(weight).all() and np.isfinite(bias).all())
    ):
        raise _corrupt(path, f"{LINEAR_FILE} weight or bias is not finite floating point")
    return LinearMap(weight, bias)


def _reliability_as_numbers(path: Path, tg: pd.DataFrame) -> pd.DataFrame:
    """targets.tsv's reliability columns (read as text) as float64; an empty cell is NaN (e.g. r of a constant)."""
    for c in [c for c in RELIABILITY_COLUMNS if c in tg.columns]:
        values = pd.to_numeric(tg[c].replace("", "nan"), errors="coerce")
        if values.isna().sum() > (tg[c].isin(["", "nan", "NaN"])).sum():
            raise _corrupt(path, f"targets.tsv column {c} holds values that are not numbers")
        tg[c] = values.astype(np.float64)
    return tg


def _check_keys(path: Path, where: str, obj, keys: dict) -> None:
    """Every key of the format (``keys``: name -> kind of :data:`_KINDS`) present in ``obj`` with its kind."""
    if not isinstance(obj, dict):
        raise _corrupt(path, f"{where} is {type(obj).__name__}, not an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _corrupt(path, f"{where} lacks {', '.join(missing)}")
    for key, kind in keys.items():
        ok, what = _KINDS[kind]
        if not ok(obj[key]):
            raise _corrupt(path, f"{where} {key} is {json.dumps(obj[key])[:40]}, not {what}")


def _check_info(path: Path, info: dict) -> tuple[dict, list, dict]:
    """bundle.json's keys, types and internal consistency; returns ``(architecture, parts, files)``."""
    _check_keys(path, "bundle.json", info, INFO_KEYS)
    arch, parts, files = info["architecture"], info["parts"], info["files"]
    _check_keys(path, "bundle.json architecture", arch, ARCHITECTURE_KEYS)
    if arch["hidden_activation"] != HIDDEN_ACTIVATION:
        raise _corrupt(
            path, f"hidden_activation {arch['hidden_activation']!r}; format {BUNDLE_FORMAT} has {HIDDEN_ACTIVATION}"
        )
    for k, p in enumerate(parts):
        _check_keys(path, f"bundle.json parts[{k}]", p, PART_KEYS)
    numbers = [p["part"] for p in parts]
    if numbers != [None] and numbers != list(range(len(parts))):
        raise _corrupt(path, f"parts are numbered {numbers}; expected 0..{len(parts) - 1} in order, or one null part")
    if arch["n_parts"] != len(parts):
        raise _corrupt(path, f"architecture n_parts is {arch['n_parts']} but {len(parts)} parts are listed")
    L, start = arch["n_landmarks"], 0
    for p in parts:
        if p["file"] != _weights_name(p["part"]):
            raise _corrupt(path, f"part {p['part']} names weights {p['file']!r}, not {_weights_name(p['part'])}")
        want = [L, p["n_targets"], arch["layers"], arch["units"]]
        if p["target_start"] != start or p["shape"] != want:
            raise _corrupt(
                path,
                f"part {p['part']} starts at target {p['target_start']} with shape {p['shape']}; the architecture "
                f"and the parts before it give start {start} and shape {want}",
            )
        start += p["n_targets"]
    if start != arch["n_targets"]:
        raise _corrupt(path, f"the parts hold {start} targets but the architecture has {arch['n_targets']}")
    if not all(isinstance(d, str) and _SHA256.fullmatch(d) for d in files.values()):
        raise _corrupt(path, "bundle.json files holds a value that is not a sha256 hex digest")
    return arch, parts, files


def _check_files(path: Path, files: dict, names: list[str], version: int = BUNDLE_FORMAT) -> None:
    """The format's files (``names``) are all listed in ``files`` with a checksum and present; nothing else listed."""
    unknown = sorted(set(files) - set(names))
    if unknown:
        raise _corrupt(path, f"bundle.json lists {', '.join(unknown)}, not a file of format {version}")
    unlisted = [n for n in names if n not in files]
    if unlisted:
        raise _corrupt(path, f"bundle.json has no checksum for {', '.join(unlisted)}")
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise _corrupt(path, f"missing file(s) {', '.join(missing)}")
    try:
        other = sorted(p.name for p in path.iterdir() if p.name not in names and p.name != "bundle.json")
    except OSError:  # a folder we may enter but not list: nothing to say about other files
        other = []
    if other:
        log.info("%s: ignoring %s (not files of a model bundle; never read)", path, ", ".join(other))


def _check_stats(path: Path, stats: dict, L: int, T: int) -> None:
    """stats.npz holds the format's arrays: finite, numeric, of the model's sizes; std >= 0, epsilon >= 0."""
    missing = [k for k in (*STATS_ARRAYS, "epsilon") if k not in stats]
    if missing:
        raise _corrupt(path, f"stats.npz lacks {', '.join(missing)}")
    eps = stats["epsilon"]
    if eps.shape != () or eps.dtype.kind not in "fiu" or not np.isfinite(eps) or eps < 0:
        raise _corrupt(path, f"stats.npz epsilon is {eps!r}, not one finite number >= 0")
    bad = [
        k
        for k in STATS_ARRAYS
        if stats[k].ndim != 1 or stats[k].dtype.kind not in "fiu" or not np.isfinite(stats[k]).all()
    ]
    if bad:
        raise _corrupt(path, f"stats.npz {', '.join(bad)} not a finite numeric vector")
    sizes = {f"stats {k}": len(stats[k]) for k in STATS_ARRAYS}
    wrong = [f"{k} has {n}" for k, n in sizes.items() if n != (L if "landmark" in k else T)]
    if wrong:
        raise _disagree(path, f"the model maps {L} landmarks -> {T} targets but {'; '.join(wrong)}")
    negative = [k for k in ("landmark_std", "target_std") if (stats[k] < 0).any()]
    if negative:
        raise _corrupt(path, f"stats.npz {', '.join(negative)} has negative values")


def _read_tables(path: Path, arch: dict, parts: list) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """landmarks.tsv, targets.tsv and stats.npz, checked against the architecture and the parts."""
    L, T = arch["n_landmarks"], arch["n_targets"]
    try:
        lm = pd.read_csv(path / "landmarks.tsv", sep="\t", dtype=str, keep_default_na=False)
        tg = pd.read_csv(path / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
        with np.load(path / "stats.npz", allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise _corrupt(path, f"unreadable gene tables or stats.npz: {exc}") from None
    # tables written before the neutral id column (their unique id in ensembl) need only the old columns
    old_cols = {
        "landmarks.tsv": ["ensembl", "entrez", "symbol"],
        "targets.tsv": ["ensembl", "entrez", "symbol", "part"],
    }
    for name, table, cols in (("landmarks.tsv", lm, LANDMARK_COLUMNS), ("targets.tsv", tg, TARGET_COLUMNS)):
        need = cols if "id" in table.columns else old_cols[name]
        if not set(need) <= set(table.columns):
            raise _corrupt(path, f"{name} lacks columns {sorted(set(need) - set(table.columns))}")
    lm, tg = split_gene_ids(lm, probe_ids=False), split_gene_ids(tg)
    wrong = [
        f"{k} has {n}"
        for k, n in (("landmarks.tsv", len(lm)), ("targets.tsv", len(tg)))
        if n != (L if "land" in k else T)
    ]
    if wrong:
        raise _disagree(path, f"the model maps {L} landmarks -> {T} targets but {'; '.join(wrong)}")
    for name, table in (("landmarks.tsv", lm), ("targets.tsv", tg)):
        ids = table["id"]
        if (ids == "").any() or ids.duplicated().any():
            raise _corrupt(
                path, f"{name} has empty or repeated ids (e.g. {ids[ids.duplicated() | (ids == '')].iloc[0]!r})"
            )
    _check_stats(path, stats, L, T)
    # each part's rows of targets.tsv carry its part number: the networks cannot be paired with the wrong genes
    for p in parts:
        label = "all" if p["part"] is None else str(p["part"])
        rows = tg["part"].iloc[p["target_start"] : p["target_start"] + p["n_targets"]]
        if (rows != label).any():
            raise _disagree(
                path,
                f"targets.tsv rows {p['target_start']}..{p['target_start'] + p['n_targets'] - 1} are not all "
                f"part {label}, but bundle.json gives them to {p['file']}",
            )
    return lm, tg, stats


def _read_network(path: Path, arch: dict, part: dict) -> DGEX:
    """The network of one part, checked against its part entry in bundle.json."""
    name = part["file"]
    try:
        blob = torch.load(path / name, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types on damaged pickles/zips
        raise _corrupt(path, f"{name} unreadable: {type(exc).__name__}") from None
    _check_keys(path, name, blob, WEIGHTS_KEYS)
    if blob["shape"] != part["shape"]:
        n_in, n_out = blob["shape"][:2]
        raise _disagree(
            path,
            f"{name} maps {n_in} -> {n_out} genes with {blob['shape'][2]}x{blob['shape'][3]} hidden units but "
            f"bundle.json gives {part['shape'][0]} landmarks, {part['n_targets']} targets for part {part['part']} "
            f"and {arch['layers']}x{arch['units']} hidden units",
        )
    net = DGEX(*blob["shape"], float(blob["dropout"]))
    try:
        net.load_state_dict(blob["state_dict"])
    except (RuntimeError, KeyError, TypeError) as exc:
        raise _disagree(path, f"{name} does not fit its declared shape ({str(exc).splitlines()[0]})") from None
    return net.eval()


def load_bundle(path, device="cpu", verify: bool = True) -> Bundle:
    """Load and check a bundle folder written by :func:`export_bundle`.

    Everything checked comes from the format (see the module docstring), not
    from bundle.json: its keys and their types, that every file of the format
    is listed with a checksum and present, that gene tables, statistics,
    parts and weights agree, and (``verify``) every file's sha256.  Any
    violation raises :class:`InputError` (one line, naming the bundle).
    """
    path = Path(path)
    info = _read_info(path)
    if _bundle_kind(path, info) == "linear":
        arch, parts, files = _check_linear_info(path, info)
        names = [*TABLE_FILES, LINEAR_FILE]
    else:
        arch, parts, files = _check_info(path, info)
        names = bundle_files(parts)
    _check_files(path, files, names, info["format_version"])
    lm, tg, stats = _read_tables(path, arch, parts)
    tg = _reliability_as_numbers(path, tg)
    if info.get("kind") == "linear":
        networks = [_read_linear(path, arch)]
    else:
        networks = [_read_network(path, arch, p) for p in parts]
    slices = [slice(p["target_start"], p["target_start"] + p["n_targets"]) for p in parts]
    if verify:
        for name in names:
            try:
                digest = sha256_file(path / name)
            except OSError as exc:
                raise _corrupt(path, f"cannot read {name}: {exc.strerror}") from None
            if digest != files[name]:
                raise _corrupt(
                    path, f"{name} does not match its checksum in bundle.json: the file was damaged or modified"
                )
    lm["entrez"] = lm["entrez"].map(clean_entrez)
    tg["entrez"] = tg["entrez"].map(clean_entrez)
    bundle = Bundle(path=path, info=info, landmarks=lm, targets=tg, stats=stats, networks=networks, part_slices=slices)
    return bundle.to(device)
