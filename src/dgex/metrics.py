"""Per-gene evaluation metrics and their summaries, shared by D-GEX and the baselines.

Arrays are ``(n_samples, n_genes)``; a metric returns one value per gene,
``(n_genes,)`` float64.  The paper's error of a gene is its mean absolute error
over the evaluation profiles (standardised units) and the overall error is the
mean over genes (+- the std over genes, ``ddof=0``).

Every run (D-GEX or baseline) writes one long-format table, ``per_gene.csv``,
with the columns :data:`PER_GENE_COLUMNS`: one row per method x ``selected_by``
(the validation set that chose the model or hyper-parameter, ``geo-va`` or
``1000g-va``) x ``split`` (the evaluation set) x target gene.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError
from .io import atomic_path

PER_GENE_COLUMNS = [
    "method",
    "selected_by",
    "split",
    "ensembl",
    "symbol",
    "entrez",
    "part",
    "overlap",
    "mae",
    "r",
    "rho",
]
GENE_COLUMNS = ["ensembl", "symbol", "entrez", "part", "overlap"]
_STRING_COLUMNS = ["method", "selected_by", "split", "ensembl", "symbol", "entrez"]
_FLOAT_COLUMNS = ["mae", "r", "rho"]

#: Elements per float64 temporary in the blocked column loops (32 MiB).
_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- #
# per-gene metrics
# --------------------------------------------------------------------------- #
def _pair(y, yhat) -> tuple[np.ndarray, np.ndarray]:
    y, yhat = np.asarray(y), np.asarray(yhat)
    if y.ndim != 2 or y.shape != yhat.shape:
        raise InputError(
            f"truth {y.shape} and prediction {yhat.shape} must both be (n_samples, n_genes) "
            f"of the same shape; pass matching arrays"
        )
    return y, yhat


def _column_blocks(n_rows: int, n_cols: int):
    """Column slices whose float64 ``(n_rows, width)`` temporaries stay near 32 MiB."""
    width = max(1, _BLOCK_ELEMENTS // max(1, n_rows))
    return [slice(s, min(n_cols, s + width)) for s in range(0, n_cols, width)]


def per_gene_mae(y, yhat) -> np.ndarray:
    """Mean absolute error of each gene: ``(n_samples, n_genes)`` x 2 -> ``(n_genes,)`` float64."""
    y, yhat = _pair(y, yhat)
    out = np.empty(y.shape[1])
    for sl in _column_blocks(*y.shape):
        out[sl] = np.abs(y[:, sl].astype(np.float64) - yhat[:, sl]).mean(axis=0)
    return out


def _pearson_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of matching float64 columns; NaN where either column is constant."""
    # exact constancy test: a float mean of a constant column need not equal it exactly
    const = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    num = np.einsum("ij,ij->j", a, b)
    den = np.sqrt(np.einsum("ij,ij->j", a, a) * np.einsum("ij,ij->j", b, b))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(num / den, -1.0, 1.0)
    r[const] = np.nan
    return r


def _per_gene_correlation(y, yhat, values) -> np.ndarray:
    """Pearson correlation of ``values(column block)`` of each gene over samples, in blocks of genes.

    ``y``, ``yhat`` are ``(n_samples, n_genes)``; ``values`` maps a block
    ``(n_samples, k)`` to the float64 values correlated.  Returns
    ``(n_genes,)``, NaN for constant columns and for fewer than 2 samples.
    """
    y, yhat = _pair(y, yhat)
    out = np.full(y.shape[1], np.nan)
    if y.shape[0] < 2:
        return out
    for sl in _column_blocks(*y.shape):
        out[sl] = _pearson_columns(values(y[:, sl]), values(yhat[:, sl]))
    return out


def per_gene_pearson(y, yhat) -> np.ndarray:
    """Pearson correlation of each gene over samples, ``(n_genes,)``; NaN for constant columns."""
    return _per_gene_correlation(y, yhat, lambda block: block.astype(np.float64))


def per_gene_spearman(y, yhat) -> np.ndarray:
    """Spearman correlation of each gene (Pearson of average ranks), ``(n_genes,)``; NaN for constant columns."""
    return _per_gene_correlation(y, yhat, lambda block: stats.rankdata(block, axis=0))


# --------------------------------------------------------------------------- #
# the per-gene table
# --------------------------------------------------------------------------- #
def per_gene_frame(targets: pd.DataFrame, method: str, selected_by: str, split: str, y, yhat) -> pd.DataFrame:
    """One evaluation as rows of :data:`PER_GENE_COLUMNS`.

    ``targets`` is the target-gene table (``ensembl, symbol, entrez, part,
    overlap``) whose rows match the columns of ``y`` and ``yhat``
    ``(n_samples, n_genes)``.
    """
    y, yhat = _pair(y, yhat)
    missing = [c for c in GENE_COLUMNS if c not in targets.columns]
    if missing:
        raise InputError(f"target table lacks column(s) {', '.join(missing)}; pass ProcessedDataset.genes().targets")
    if len(targets) != y.shape[1]:
        raise InputError(
            f"{len(targets)} target genes but {y.shape[1]} predicted columns; "
            f"pass the target rows that match the predicted columns"
        )
    frame = pd.DataFrame(
        {
            "method": method,
            "selected_by": selected_by,
            "split": split,
            "ensembl": targets["ensembl"].astype(str).values,
            "symbol": targets["symbol"].astype(str).values,
            "entrez": targets["entrez"].astype(str).values,
            "part": targets["part"].astype(np.int64).values,
            "overlap": targets["overlap"].astype(bool).values,
            "mae": per_gene_mae(y, yhat),
            "r": per_gene_pearson(y, yhat),
            "rho": per_gene_spearman(y, yhat),
        },
        columns=PER_GENE_COLUMNS,
    )
    return frame


def _check_columns(frame: pd.DataFrame, where) -> None:
    missing = [c for c in PER_GENE_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(
            f"{where}: per-gene table lacks column(s) {', '.join(missing)}; "
            f"regenerate it with this dgex version (columns: {', '.join(PER_GENE_COLUMNS)})"
        )


def write_per_gene(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """Write a per-gene table as CSV atomically (columns in :data:`PER_GENE_COLUMNS` order)."""
    _check_columns(frame, path)
    with atomic_path(path) as tmp:
        frame[PER_GENE_COLUMNS].to_csv(tmp, index=False, float_format="%.8g")


def read_per_gene(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``per_gene.csv`` written by :func:`write_per_gene`, checking its columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: per-gene table not found; run `dgex train` or `dgex baseline` first")
    try:
        # gene ids stay strings (symbol "NA", entrez "nan" are ids, not missing values)
        frame = pd.read_csv(
            path,
            dtype=dict.fromkeys(_STRING_COLUMNS, str),
            keep_default_na=False,
            na_values={c: ["", "nan", "NaN"] for c in _FLOAT_COLUMNS},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse per-gene table ({exc}); regenerate it") from None
    _check_columns(frame, path)
    try:
        for c in _FLOAT_COLUMNS:
            frame[c] = frame[c].astype(np.float64)
        frame["part"] = frame["part"].astype(np.int64)
        if frame["overlap"].dtype != bool:
            lookup = {"true": True, "false": False, "1": True, "0": False}
            flags = frame["overlap"].astype(str).str.lower().map(lookup)
            if flags.isna().any():
                raise ValueError(f"overlap values {sorted(set(frame['overlap'][flags.isna()].astype(str)))[:3]}")
            frame["overlap"] = flags.astype(bool)
    except ValueError as exc:
        raise InputError(f"{path}: malformed per-gene table ({exc}); regenerate it") from None
    return frame[PER_GENE_COLUMNS]


# --------------------------------------------------------------------------- #
# summaries
# --------------------------------------------------------------------------- #
def _num(value) -> float | None:
    """A JSON-friendly float: None where undefined."""
    value = float(value)
    return None if math.isnan(value) else value


def overall(frame_or_mae, exclude_overlap: bool = False, overlap=None) -> dict:
    """Overall error of one evaluation: mean and std (``ddof=0``) over genes of MAE, mean r and rho.

    ``frame_or_mae`` is a per-gene frame of ONE method x selected_by x split
    (its ``overlap`` column is used), or an ``(n_genes,)`` MAE array (then pass
    ``overlap`` ``(n_genes,)`` bool to exclude the overlap genes).
    ``exclude_overlap`` drops the targets that are also landmarks.  Values that
    are undefined (no genes, all correlations NaN) are None.
    """
    if isinstance(frame_or_mae, pd.DataFrame):
        frame = frame_or_mae
        _check_columns(frame, "overall()")
        groups = frame[["method", "selected_by", "split"]].drop_duplicates()
        if len(groups) > 1:
            raise InputError(
                f"per-gene frame holds {len(groups)} evaluations (method x selected_by x split); "
                f"select one before calling overall()"
            )
        mae = frame["mae"].to_numpy(np.float64)
        r, rho = frame["r"].to_numpy(np.float64), frame["rho"].to_numpy(np.float64)
        overlap = frame["overlap"].to_numpy(bool)
    else:
        mae = np.asarray(frame_or_mae, dtype=np.float64).ravel()
        r = rho = None
        if overlap is not None:
            overlap = np.asarray(overlap, dtype=bool).ravel()
            if overlap.shape != mae.shape:
                raise InputError(f"overlap has {overlap.size} flags for {mae.size} genes; pass one flag per gene")
        elif exclude_overlap:
            raise InputError("exclude_overlap needs the overlap flags; pass a per-gene frame or overlap=")
    keep = ~overlap if exclude_overlap else np.ones(mae.shape, bool)
    out = {"n_genes": int(keep.sum()), "mae_mean": None, "mae_std": None, "r_mean": None, "rho_mean": None}
    if keep.any():
        out["mae_mean"] = _num(mae[keep].mean())
        out["mae_std"] = _num(mae[keep].std())
        for key, values in (("r_mean", r), ("rho_mean", rho)):
            if values is not None and np.isfinite(values[keep]).any():
                out[key] = _num(np.nanmean(values[keep]))
    return out


def compare(mae_a, mae_b) -> dict:
    """Gene-wise comparison of method A against method B on the same genes, ``(n_genes,)`` each.

    Returns the fraction of genes where A has the lower error (``a_wins``; the
    paper's "D-GEX outperforms LR in 99.97% of the target genes"), where B
    has (``b_wins``), the two-sided Wilcoxon signed-rank p-value of the paired
    errors (1.0 when all pairs are equal) and the relative improvement of the
    overall error ``(mean_b - mean_a) / mean_b``.  Genes with a NaN error in
    either method are dropped.
    """
    a = np.asarray(mae_a, dtype=np.float64).ravel()
    b = np.asarray(mae_b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise InputError(f"cannot compare {a.size} genes with {b.size} genes; align both to the same genes")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n == 0:
        raise InputError("no gene has a finite error in both methods; check the per-gene tables")
    diff = a - b
    if np.all(diff == 0):
        p = 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small-sample / ties notes from scipy
            p = float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
    mean_a, mean_b = float(a.mean()), float(b.mean())
    return {
        "n_genes": n,
        "a_wins": float(np.mean(diff < 0)),
        "b_wins": float(np.mean(diff > 0)),
        "wilcoxon_p": _num(p),
        "mean_a": mean_a,
        "mean_b": mean_b,
        "rel_improvement": _num((mean_b - mean_a) / mean_b) if mean_b != 0 else None,
    }


def bootstrap_ci(mae, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over genes of ``mae`` ``(n_genes,)``, resampling genes.

    Resamples are drawn in blocks so the index matrix stays near 32 MiB.
    NaN errors are dropped first.
    """
    x = np.asarray(mae, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise InputError("bootstrap_ci needs at least one finite per-gene error")
    if int(n_boot) < 1 or not 0.0 < level < 1.0:
        raise InputError(f"bootstrap_ci needs n_boot >= 1 and 0 < level < 1 (got {n_boot}, {level})")
    rng = np.random.default_rng(seed)
    n_boot = int(n_boot)
    means = np.empty(n_boot)
    rows = max(1, _BLOCK_ELEMENTS // x.size)
    for s in range(0, n_boot, rows):
        m = min(rows, n_boot - s)
        means[s : s + m] = x[rng.integers(0, x.size, size=(m, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)
