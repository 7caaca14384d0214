"""Stage ``interpret``: the paper's supplementary analyses of a trained network (section 3.3).

**S2 -- examining the nonlinearity.**  For every target gene, the adjusted R²
of an ordinary least-squares fit (with intercept) of the gene's expression
from (a) the raw landmark inputs and (b) each hidden layer's activations
(eval mode, so no dropout).  The paper fits and reports on GEO-tr ("We
calculated the adjusted R² ... for each target gene based on GEO-tr"), i.e.
the in-sample adjusted R², and compares the raw inputs with the last hidden
layer of D-GEX-10%-9000x3; here every hidden layer is reported.  Adjusted R² =
``1 - (1 - R²) (n - 1) / (n - p - 1)`` with ``p`` the number of predictors
(landmarks or hidden units).

All genes are fitted at once from streamed sufficient statistics
(:class:`GramFit`): the centred Gram matrix ``X'X`` ``(p, p)`` and ``X'Y``
``(p, T)`` are accumulated over sample chunks in float64, and the explained
sum of squares ``y'X (X'X)^+ X'y`` of every gene comes from one symmetric
eigendecomposition, with eigenvalues below ``p * eps * max`` dropped, so
collinear predictors (saturated or dead tanh units) are handled like a
pseudo-inverse / minimum-norm least-squares solution.

**S3 -- visualising the major weights.**  For a one-hidden-layer network (the
paper's D-GEX-10%-3000x1), a weight is *major* if it lies more than ``k``
standard deviations from the mean.  As in the paper, mean and standard
deviation are taken per input unit (a landmark's weights to all hidden units)
for the input->hidden matrix and per output unit (a target's weights from all
hidden units) for the hidden->output matrix (``scope="unit"``); ``scope="matrix"``
uses one mean/std per matrix instead.  The paper used k = 4 for the input and
k = 5 for the output connections; here every k in ``sigmas`` is applied to both.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .dataset import SPLITS, ProcessedDataset
from .errors import ConfigError, InputError
from .genes import ALL_PROBES, ID_COLUMNS, split_gene_ids
from .io import atomic_path, staged_files, write_json
from .plotting import pyplot, save_figure
from .runs import check_dataset, load_runs
from .settings import S2Settings, S3Settings

log = logging.getLogger(__name__)

SCOPES = ("unit", "matrix")
#: Positive major weights are drawn red, negative blue, as in the paper's Figure S3.
POS_COLOR, NEG_COLOR = "#d62728", "#1f77b4"


# --------------------------------------------------------------------------- #
# adjusted R² from streamed sufficient statistics
# --------------------------------------------------------------------------- #
class GramFit:
    """Multi-output OLS with intercept, fitted from sufficient statistics accumulated over chunks.

    ``update(x, y)`` takes ``x`` ``(batch, p)`` predictors and ``y`` ``(batch, t)``
    targets; :meth:`solve` returns per-target R² and adjusted R².  Values are
    shifted by the first chunk's means before accumulating so the later
    centring does not lose precision to cancellation.
    """

    def __init__(self, n_predictors: int, n_targets: int, device: str | torch.device = "cpu"):
        self.p, self.t = int(n_predictors), int(n_targets)
        self.device = torch.device(device)
        z = dict(dtype=torch.float64, device=self.device)
        self.n = 0
        self.shift_x = self.shift_y = None
        self.sx, self.sy = torch.zeros(self.p, **z), torch.zeros(self.t, **z)
        self.sxx, self.sxy = torch.zeros(self.p, self.p, **z), torch.zeros(self.p, self.t, **z)
        self.syy = torch.zeros(self.t, **z)

    @torch.no_grad()
    def update(self, x, y) -> None:
        """Add a chunk: predictors ``x`` ``(batch, p)`` and targets ``y`` ``(batch, t)`` of the same profiles."""
        x = torch.as_tensor(x, device=self.device).to(torch.float64)
        y = torch.as_tensor(y, device=self.device).to(torch.float64)
        if x.shape[1] != self.p or y.shape[1] != self.t or x.shape[0] != y.shape[0]:
            raise ValueError(f"chunk shapes {tuple(x.shape)}, {tuple(y.shape)} do not fit p={self.p}, t={self.t}")
        if self.shift_x is None:
            self.shift_x, self.shift_y = x.mean(0), y.mean(0)
        x, y = x - self.shift_x, y - self.shift_y
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.sxx += x.T @ x
        self.sxy += x.T @ y
        self.syy += (y * y).sum(0)

    @torch.no_grad()
    def solve(self) -> dict:
        """``{"r2": (t,), "adjusted": (t,), "rank", "n", "p", "note"}``; NaN where undefined.

        ``adjusted`` is NaN for every gene when ``n <= p + 1`` (no residual
        degrees of freedom), and R² is NaN for a constant target.
        """
        n, p = self.n, self.p
        if n < 2:
            raise InputError(f"adjusted R² needs at least 2 samples, got {n}; use a larger split or --max-samples")
        mx, my = self.sx / n, self.sy / n
        sxx = self.sxx - n * torch.outer(mx, mx)
        sxy = self.sxy - n * torch.outer(mx, my)
        syy = self.syy - n * my * my
        lam, vec = torch.linalg.eigh((sxx + sxx.T) / 2)
        tol = max(float(lam.max()), 0.0) * p * torch.finfo(torch.float64).eps
        keep = lam > tol
        proj = vec[:, keep].T @ sxy  # (rank, t) coordinates of X'y in the eigenbasis
        ssr = (proj * proj / lam[keep, None]).sum(0)  # explained sum of squares per target
        constant = syy <= 1e-12 * n
        r2 = torch.where(constant, torch.nan, (ssr / syy.clamp_min(1e-300)).clamp(0.0, 1.0))
        note = None
        if n > p + 1:
            adjusted = 1.0 - (1.0 - r2) * (n - 1) / (n - p - 1)
        else:
            adjusted = torch.full_like(r2, torch.nan)
            note = (
                f"adjusted R² undefined: n={n} samples but {p} predictors need n > p + 1; "
                f"use a split with more samples (or a larger --max-samples)"
            )
        return {
            "r2": r2.cpu().numpy(),
            "adjusted": adjusted.cpu().numpy(),
            "rank": int(keep.sum()),
            "n": n,
            "p": p,
            "note": note,
        }


def adjusted_r2(X: np.ndarray, Y: np.ndarray, chunk_size: int = 8192) -> np.ndarray:
    """Adjusted R² ``(t,)`` of OLS (with intercept) of each column of ``Y`` ``(n, t)`` on ``X`` ``(n, p)``."""
    fit = GramFit(X.shape[1], Y.shape[1])
    for s in range(0, X.shape[0], chunk_size):
        fit.update(X[s : s + chunk_size], Y[s : s + chunk_size])
    return fit.solve()["adjusted"]


# --------------------------------------------------------------------------- #
# run folders
# --------------------------------------------------------------------------- #
def _part_targets(targets: pd.DataFrame, part) -> pd.DataFrame:
    if part is None:
        return targets
    if part >= int(targets["part"].max()) + 1:
        raise InputError(
            f"run of target part {part}, but the dataset has parts 0..{int(targets['part'].max())}; "
            f"use the dataset the model was trained on"
        )
    return targets[targets["part"] == part].reset_index(drop=True)


def _arch_name(arch) -> str:
    return f"D-GEX-{arch[2] * 100:g}%-{arch[1]}x{arch[0]}"


def _network_info(run_list: list[dict], selection: str) -> dict:
    """The analysed network as S2/S3 record it in their JSON (runs from :func:`dgex.runs.load_runs`)."""
    layers, units, dropout = run_list[0]["arch"]
    return {
        "name": _arch_name(run_list[0]["arch"]),
        "layers": layers,
        "units": units,
        "dropout": dropout,
        "selection": selection,
        "runs": [str(r["dir"]) for r in run_list],
        "parts": ["all" if r["part"] is None else r["part"] for r in run_list],
    }


# --------------------------------------------------------------------------- #
# figures
# --------------------------------------------------------------------------- #
def _write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


# --------------------------------------------------------------------------- #
# S2
# --------------------------------------------------------------------------- #
def interpret_s2(
    *,
    dataset,
    runs,
    output_dir,
    selection: str = "geo-va",
    split: str = "geo-tr",
    max_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 4096,
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Adjusted R² of every target gene from the landmarks and from each hidden layer; writes S2 outputs.

    Writes into ``output_dir``: ``s2_adjusted_r2.csv`` (one row per target gene:
    ``id, ensembl, entrez, symbol, probe, part, overlap, input, hidden1..hiddenN``),
    ``s2_summary.csv`` (one row per representation), ``figure_s2.png/.pdf`` and
    ``s2.json`` (settings, per-fit rank/notes, summary, captions).  Returns the
    ``s2.json`` content.
    """
    S2Settings.check(locals())
    from .devices import pick_device

    run_list = load_runs(runs, selection)
    layers, units, _ = run_list[0]["arch"]
    dev = pick_device(device)
    reps = ["input"] + [f"hidden{i + 1}" for i in range(layers)]

    with ProcessedDataset(dataset) as ds:
        _check_split(ds, split, dataset)
        genes = ds.genes()
        fingerprint = ds.fingerprint()
        n_total = ds.n_samples(split)
        rows = _sampled_rows(n_total, max_samples, seed)
        X = _take(ds.X(split), rows)
        n_predictors = {rep: X.shape[1] if rep == "input" else units for rep in reps}
        frames, fits = [], []
        for run in run_list:  # one part network at a time
            frame, part_fits = _fit_part(ds, run, genes, split, rows, X, n_predictors, dev, batch_size, progress)
            frames.append(frame)
            fits += part_fits
        n_parts = genes.n_parts
    check_dataset({str(r["dir"]): r["info"].get("dataset_fingerprint") for r in run_list}, fingerprint, dataset)

    table = pd.concat(frames, ignore_index=True)
    n = X.shape[0]
    status, undefined, reason = _s2_status(reps, fits, n_predictors, split, n)
    summary = _s2_summary(table, reps, fits, n_predictors, n, undefined, reason)
    name = _arch_name(run_list[0]["arch"])
    last = reps[-1]
    frac = float(summary.loc[summary["representation"] == last, "frac_above_input"].iloc[0])

    with staged_files(Path(output_dir)) as stage:  # all outputs or none
        _write_csv(table, stage / "s2_adjusted_r2.csv")
        _write_csv(summary, stage / "s2_summary.csv")
        files = ["s2_adjusted_r2.csv", "s2_summary.csv"] + _figure_s2(table, reps, name, split, stage, status, reason)
        info = {
            "analysis": "S2",
            "status": status,
            "reason": reason,
            "network": _network_info(run_list, selection),
            "dataset": str(dataset),
            "split": split,
            "n_samples": n,
            "n_samples_split": n_total,
            "max_samples": max_samples,
            "seed": seed,
            "device": str(dev),
            "targets_covered": len(table),
            "all_parts_covered": run_list[0]["part"] is None or len(run_list) == n_parts,
            "adjusted_r2": "1 - (1 - R2) (n - 1) / (n - p - 1), p = number of predictors; fit and R2 on the same split",
            "fits": fits,
            "notes": [f"part {f['part']} {f['representation']}: {f['note']}" for f in fits if f["note"]],
            "summary": json.loads(summary.to_json(orient="records")),
            "files": files + ["s2.json"],
            "captions": _s2_captions(name, table, split, n, X.shape[1], units, selection, status, reason, frac),
        }
        write_json(stage / "s2.json", info)
    if status != "computed":
        return info
    log.info(
        "S2 %s on %s (n=%d): mean adjusted R2 input %.4f, %s %.4f; %.2f%% of genes above input",
        name,
        split,
        n,
        summary["mean"].iloc[0],
        last,
        summary["mean"].iloc[-1],
        100 * frac,
    )
    return info


def _check_split(ds: ProcessedDataset, split: str, dataset) -> None:
    """Refuse a split the dataset does not hold, naming the ones it does."""
    if split not in SPLITS or not ds.has(split):
        raise ConfigError(
            f"--split {split!r} is not in {dataset} (splits: {', '.join(ds.splits)}); "
            f"pick one of those (the paper uses geo-tr)"
        )


def _sampled_rows(n_total: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted seeded subsample of ``max_samples`` of the split's ``n_total`` profiles; None keeps them all."""
    if max_samples is None or max_samples >= n_total:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_total, size=max_samples, replace=False))


def _take(a: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
    """The profiles ``rows`` of ``a`` ``(n_samples, n_genes)``, or all of them when ``rows`` is None."""
    return a[rows] if rows is not None else a


def _fit_part(
    ds, run, genes, split, rows, X, n_predictors, dev, batch_size, progress
) -> tuple[pd.DataFrame, list[dict]]:
    """Adjusted R² of one part network's targets from the landmarks and from each of its hidden layers.

    ``X`` ``(n_samples, n_landmarks)`` are the profiles' landmarks; the part's
    targets ``(n_samples, n_targets)`` are read from ``ds`` for the same
    ``rows``.  The network's activations are streamed in chunks of
    ``batch_size`` profiles into one :class:`GramFit` per representation
    (``n_predictors``: representation -> number of predictors, inputs first).  Returns the per-gene table (``id, ensembl, entrez, symbol, probe, part, overlap`` and
    one column per representation) and one fit record (part, representation,
    n, p, rank, note) per representation.
    """
    from tqdm.auto import tqdm

    from .checkpoints import load_weights

    part = run["part"]
    targets = _part_targets(genes.targets, part)
    model, _ = load_weights(
        run["checkpoint"],
        gene_ids={"landmarks": genes.landmarks["ensembl"].tolist(), "targets": targets["ensembl"].tolist()},
    )
    model.to(dev).eval()
    Y = _take(ds.Y(split, part), rows)
    stats = {rep: GramFit(p, Y.shape[1], dev) for rep, p in n_predictors.items()}
    desc = f"S2 part {'all' if part is None else part}"
    with torch.no_grad():
        for s in tqdm(range(0, X.shape[0], batch_size), desc=desc, unit="chunk", disable=not progress, leave=False):
            xb = torch.as_tensor(X[s : s + batch_size], device=dev)
            yb = torch.as_tensor(Y[s : s + batch_size], device=dev)
            _, acts = model(xb, return_hidden=True)
            for fit, rep in zip(stats.values(), [xb, *acts]):
                fit.update(rep, yb)
    frame = split_gene_ids(targets, probe_ids=str(ds.params.get("targets")) == ALL_PROBES)
    frame = frame[[*ID_COLUMNS, "part", "overlap"]].copy()
    fits = []
    for rep, fit in stats.items():
        res = fit.solve()
        frame[rep] = res["adjusted"]
        fits.append({"part": part, "representation": rep, **{k: res[k] for k in ("n", "p", "rank", "note")}})
        if res["note"]:  # one warning later says what was not computed
            log.debug("S2 part %s %s: %s", part, rep, res["note"])
    return frame, fits


def _s2_status(reps: list[str], fits: list[dict], n_predictors: dict, split: str, n: int):
    """``(status, undefined, reason)``: which representations had too few profiles for their predictors.

    A fit with p predictors needs n > p + 1 profiles.  S2 is optional, so its
    outputs then say what was not computed and why instead of failing the run:
    status is "computed", "partial" or "not computed".
    """
    undefined = [rep for rep in reps if any(f["note"] for f in fits if f["representation"] == rep)]
    status = "computed" if not undefined else "not computed" if len(undefined) == len(reps) else "partial"
    reason = _s2_reason(undefined, n_predictors, split, n) if undefined else None
    if reason:
        log.warning("S2 %s: %s", status, reason)
    return status, undefined, reason


def _s2_summary(
    table: pd.DataFrame, reps: list[str], fits: list[dict], n_predictors: dict, n: int, undefined: list[str], reason
) -> pd.DataFrame:
    """One row per representation: predictors, rank, and the distribution of the genes' adjusted R².

    ``table`` has one row per target gene and one adjusted-R² column per
    representation in ``reps``; ``frac_above_input`` is the fraction of genes
    whose adjusted R² exceeds the raw inputs'.
    """
    rows = []
    for rep in reps:
        v = table[rep].dropna()  # (the statistics skip NaN anyway; an all-NaN median would warn)
        no_ov = table.loc[~table["overlap"].astype(bool), rep].dropna()
        row = {
            "representation": rep,
            "n_predictors": n_predictors[rep],
            "rank_min": min(f["rank"] for f in fits if f["representation"] == rep),
            "n_samples": n,
            "n_genes": int(v.notna().sum()),
            "mean": v.mean(),
            "median": v.median(),
            "q25": v.quantile(0.25),
            "q75": v.quantile(0.75),
            "mean_no_overlap": no_ov.mean(),
            "median_no_overlap": no_ov.median(),
            "frac_above_input": np.nan if rep == "input" else _frac_above(table[rep], table["input"]),
        }
        if undefined:  # only then, so that a computed S2 keeps its columns
            row["status"] = "not computed" if rep in undefined else "computed"
            row["reason"] = reason if rep in undefined else ""
        rows.append(row)
    return pd.DataFrame(rows)


def _s2_captions(name, table, split, n, n_landmarks, units, selection, status, reason, frac) -> dict:
    """Captions of Figure S2 and of the two S2 tables, as recorded in ``s2.json``."""
    if status == "not computed":
        figure = f"Supplementary Figure S2 of {name} on {split}: not computed: {reason}"
    else:
        figure = (
            f"Supplementary Figure S2. Adjusted R² of a linear regression of each of {len(table):,} target genes "
            f"on {split} (n = {n:,} profiles), fitted and evaluated on the same profiles, from the "
            f"{n_landmarks:,} raw landmark inputs and from the activations of each hidden layer "
            f"({units:,} units) of {name} (model selected by {selection}). Left: distribution per "
            f"representation. Right: gene-wise comparison of the raw inputs with the last hidden layer; "
            + (
                f"{frac:.2%} of the genes lie above the diagonal (paper: 99.99% for D-GEX-10%-9000x3 on GEO-tr)."
                if status == "computed"
                else f"not computed: {reason}"
            )
        )
    return {
        "figure_s2": figure,
        "s2_adjusted_r2": "Adjusted R² per target gene (rows) and representation (columns: raw landmark "
        "inputs, hidden layers 1..N); overlap marks targets that are also landmarks.",
        "s2_summary": "Mean, median and quartiles of the adjusted R² per representation; "
        "frac_above_input = fraction of genes whose adjusted R² exceeds the raw inputs'.",
    }


def _s2_reason(undefined: list[str], n_predictors: dict, split: str, n: int) -> str:
    """Why the adjusted R² of ``undefined`` representations cannot be computed, and what to change."""
    what = ", ".join(
        f"the {n_predictors[r]:,} raw landmark inputs"
        if r == "input"
        else f"hidden layer {r[6:]} ({n_predictors[r]:,} units)"
        for r in undefined
    )
    need = max(n_predictors[r] for r in undefined) + 2
    return (
        f"adjusted R² is undefined for {what}: a fit with p predictors needs more than p + 1 profiles and "
        f"{split} has {n:,}; use a split with at least {need:,} profiles (interpret.s2_split / --split, without "
        f"a smaller s2_max_samples / --max-samples) or set interpret.s2: false"
    )


def _frac_above(a: pd.Series, b: pd.Series) -> float:
    ok = a.notna() & b.notna()
    return float((a[ok] > b[ok]).mean()) if ok.any() else float("nan")


def _figure_s2(
    table: pd.DataFrame,
    reps: list[str],
    name: str,
    split: str,
    out: Path,
    status: str = "computed",
    reason: str | None = None,
) -> list[str]:
    plt = pyplot()
    if status == "not computed":  # a figure that says so, where the report expects Figure S2
        fig, ax = plt.subplots(figsize=(10, 4.2))
        ax.axis("off")
        ax.set_title(f"Supplementary Figure S2, {name} on {split}: not computed")
        ax.text(0.5, 0.5, textwrap.fill(f"not computed: {reason}", 90), ha="center", va="center", wrap=True)
        return save_figure(fig, out, "figure_s2")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = ["raw inputs" if r == "input" else f"hidden layer {r[6:]}" for r in reps]
    data = [table[r].dropna().to_numpy() for r in reps]
    keep = [i for i, d in enumerate(data) if d.size]
    ax1.boxplot([data[i] for i in keep], showfliers=False)
    ax1.set_xticks(range(1, len(keep) + 1), [labels[i] for i in keep], rotation=20)
    ax1.set_ylabel(f"adjusted R² per target gene ({split})")
    ax1.set_title(f"(a) adjusted R² by representation, {name}")
    ax1.grid(axis="y", alpha=0.3)
    last = reps[-1]
    both = table[["input", last]].dropna()
    if not len(both) and reason:  # the raw inputs or the last hidden layer could not be fitted
        ax2.text(0.5, 0.5, textwrap.fill(f"not computed: {reason}", 50), ha="center", va="center", fontsize=8)
    if len(both):
        above = both[last] > both["input"]
        ax2.scatter(
            both.loc[~above, "input"],
            both.loc[~above, last],
            s=4,
            alpha=0.5,
            color=NEG_COLOR,
            label=f"below diagonal ({(~above).mean():.2%})",
            rasterized=True,
        )
        ax2.scatter(
            both.loc[above, "input"],
            both.loc[above, last],
            s=4,
            alpha=0.5,
            color=POS_COLOR,
            label=f"above diagonal ({above.mean():.2%})",
            rasterized=True,
        )
        lo = float(min(both.min().min(), 0.0))
        ax2.plot([lo, 1], [lo, 1], color="black", lw=0.8, ls="--")
        ax2.legend(loc="upper left", markerscale=3)
    ax2.set_xlabel("adjusted R², raw landmark inputs")
    ax2.set_ylabel(f"adjusted R², {labels[-1]} activations")
    ax2.set_title("(b) gene-wise comparison")
    fig.tight_layout()
    return save_figure(fig, out, "figure_s2")


# --------------------------------------------------------------------------- #
# S3
# --------------------------------------------------------------------------- #
def major_weights(w: np.ndarray, k: float, axis: int | None) -> np.ndarray:
    """Boolean mask of entries more than ``k`` standard deviations from the mean.

    Mean and standard deviation are taken along ``axis`` (per unit; the other
    axis indexes the units) or over the whole matrix (``axis=None``).
    """
    w = np.asarray(w, dtype=np.float64)
    mean = w.mean(axis=axis, keepdims=True)
    std = w.std(axis=axis, keepdims=True)
    return np.abs(w - mean) > k * std


def _degrees(w: np.ndarray, mask: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(total, positive, negative) numbers of major weights summed over ``axis``."""
    pos = (mask & (w > 0)).sum(axis=axis)
    neg = (mask & (w < 0)).sum(axis=axis)
    return pos + neg, pos, neg


def _hubs_for_half(out_degree: np.ndarray) -> int:
    """Fewest hidden units that together carry at least half of all major output connections."""
    total = out_degree.sum()
    if total == 0:
        return 0
    return int(np.searchsorted(np.cumsum(np.sort(out_degree)[::-1]), total / 2) + 1)


def s3_degrees(w_in: np.ndarray, w_out: np.ndarray, k: float, scope: str = "unit") -> dict:
    """Major-weight degrees of a one-hidden-layer network at threshold ``k``.

    ``w_in`` ``(H, L)`` is the input->hidden weight (torch ``Linear`` layout:
    rows are hidden units, columns landmarks); ``w_out`` ``(T, H)`` the
    hidden->output weight.  With ``scope="unit"`` (the paper) the statistics
    are per landmark (over its ``H`` outgoing weights) and per target (over
    its ``H`` incoming weights).  Returns masks and degree arrays:
    ``hidden_in`` ``(H,)`` landmarks per hidden unit, ``landmark_out`` ``(L,)``,
    ``target_in`` ``(T,)`` hidden units per target, ``hidden_out`` ``(H,)``,
    each as (total, positive, negative).
    """
    if scope not in SCOPES:
        raise ConfigError(f"--scope must be one of {', '.join(SCOPES)} (got {scope!r})")
    m_in = major_weights(w_in, k, axis=0 if scope == "unit" else None)
    m_out = major_weights(w_out, k, axis=1 if scope == "unit" else None)
    return {
        "mask_in": m_in,
        "mask_out": m_out,
        "hidden_in": _degrees(w_in, m_in, 1),
        "landmark_out": _degrees(w_in, m_in, 0),
        "target_in": _degrees(w_out, m_out, 1),
        "hidden_out": _degrees(w_out, m_out, 0),
    }


def _s3_counts(d: dict) -> dict:
    hid_in, lm_out, tg_in, hid_out = (d[key][0] for key in ("hidden_in", "landmark_out", "target_in", "hidden_out"))
    _, pos, neg = d["hidden_out"]
    multi = hid_out >= 2  # a unit with one output connection is trivially single-signed
    return {
        "input_connections": int(d["mask_in"].sum()),
        "landmarks": int(lm_out.size),
        "landmarks_connected": int((lm_out > 0).sum()),
        "hidden_units": int(hid_in.size),
        "hidden_with_major_input": int((hid_in > 0).sum()),
        "hidden_without_major_input": int((hid_in == 0).sum()),
        "output_connections": int(d["mask_out"].sum()),
        "targets": int(tg_in.size),
        "targets_connected": int((tg_in > 0).sum()),
        "hidden_with_major_output": int((hid_out > 0).sum()),
        "hidden_without_major_output": int((hid_out == 0).sum()),
        "hidden_with_major_input_and_output": int(((hid_in > 0) & (hid_out > 0)).sum()),
        "hubs_for_half_of_output_connections": _hubs_for_half(hid_out),
        "max_hidden_out_degree": int(hid_out.max()) if hid_out.size else 0,
        "hubs_2plus_outputs": int(multi.sum()),
        "hubs_2plus_only_positive": int((multi & (neg == 0)).sum()),
        "hubs_2plus_only_negative": int((multi & (pos == 0)).sum()),
    }


def interpret_s3(
    *,
    runs,
    output_dir,
    selection: str = "geo-va",
    sigmas=(4.0, 5.0),
    scope: str = "unit",
    map_sigmas=(4.0, 5.0),
    map_size: int = 60,
    dataset=None,
    progress: bool = True,
) -> dict:
    """Major-weight connectivity of a one-hidden-layer network; writes the S3 outputs.

    Writes into ``output_dir`` (one row per part x sigma x unit/gene):
    ``s3_hidden_in_degree.csv`` (``part, sigma, unit, n_landmarks, n_positive,
    n_negative``), ``s3_target_in_degree.csv`` (``part, sigma, id, ensembl, entrez, symbol, probe,
    n_hidden, n_positive, n_negative``), ``s3_landmark_out_degree.csv``
    (``part, sigma, id, ensembl, entrez, symbol, probe, n_hidden, n_positive, n_negative``),
    ``s3_hidden_out_degree.csv`` (``part, sigma, unit, n_targets, n_positive,
    n_negative``), ``figure_s3.png/.pdf`` and ``s3.json`` (summary counts per
    part and sigma, captions).  ``map_sigmas`` = (input k, output k) of the
    connectivity map (the paper: 4 and 5).  Returns the ``s3.json`` content.
    """
    S3Settings.check(locals())
    from tqdm.auto import tqdm

    from .checkpoints import load_weights

    sigmas = sorted({float(k) for k in sigmas})
    map_sigmas = [float(k) for k in map_sigmas]
    run_list = load_runs(runs, selection)
    layers, units, dropout = run_list[0]["arch"]
    if layers != 1:
        raise InputError(
            f"S3 analyses a network with one hidden layer (the paper's 3000x1), but "
            f"{run_list[0]['dir']} has {layers} hidden layers; pass the part runs of a 1-layer network"
        )
    genes = fingerprint = probe_targets = None  # None: probe targets told by their ids (no dataset)
    if dataset is not None:
        with ProcessedDataset(dataset) as ds:
            genes = ds.genes()
            fingerprint = ds.fingerprint()
            probe_targets = str(ds.params.get("targets")) == ALL_PROBES

    hid_in_rows, tg_rows, lm_rows, hid_out_rows, counts, nets = [], [], [], [], [], []
    for run in tqdm(run_list, desc="S3", unit="run", disable=not progress, leave=False):
        part = run["part"]
        gene_ids = None
        if genes is not None:
            gene_ids = {
                "landmarks": genes.landmarks["ensembl"].tolist(),
                "targets": _part_targets(genes.targets, part)["ensembl"].tolist(),
            }
        model, blob = load_weights(run["checkpoint"], gene_ids=gene_ids)
        lm_ids = list(blob.get("genes", {}).get("landmarks", [f"landmark{i}" for i in range(model.n_in)]))
        tg_ids = list(blob.get("genes", {}).get("targets", [f"target{i}" for i in range(model.n_out)]))
        lm_keys = _gene_keys(genes.landmarks if genes is not None else None, lm_ids, probe_ids=False)
        tg_keys = _gene_keys(genes.targets if genes is not None else None, tg_ids, probe_ids=probe_targets)
        w_in = model.hidden[0].weight.detach().double().numpy()  # (H, L)
        w_out = model.output.weight.detach().double().numpy()  # (T, H)
        part_label = "all" if part is None else part
        unit_idx = np.arange(w_in.shape[0])
        for k in sigmas:
            d = s3_degrees(w_in, w_out, k, scope)
            hid_in_rows.append(_degree_frame(part_label, k, {"unit": unit_idx}, d["hidden_in"], "n_landmarks"))
            hid_out_rows.append(_degree_frame(part_label, k, {"unit": unit_idx}, d["hidden_out"], "n_targets"))
            lm_rows.append(_degree_frame(part_label, k, lm_keys, d["landmark_out"], "n_hidden"))
            tg_rows.append(_degree_frame(part_label, k, tg_keys, d["target_in"], "n_hidden"))
            counts.append({"part": part_label, "sigma_in": k, "sigma_out": k, **_s3_counts(d)})
        # the paper's map: input connections at k_in, output connections at k_out
        d_in, d_out = (s3_degrees(w_in, w_out, k, scope) for k in map_sigmas)
        d_map = {
            "mask_in": d_in["mask_in"],
            "hidden_in": d_in["hidden_in"],
            "landmark_out": d_in["landmark_out"],
            "mask_out": d_out["mask_out"],
            "target_in": d_out["target_in"],
            "hidden_out": d_out["hidden_out"],
        }
        counts.append(
            {
                "part": part_label,
                "sigma_in": map_sigmas[0],
                "sigma_out": map_sigmas[1],
                "map": True,
                **_s3_counts(d_map),
            }
        )
        nets.append(
            {
                "part": part_label,
                "w_in": w_in,
                "w_out": w_out,
                "d": d_map,
                "lm": lm_keys["symbol"],
                "tg": tg_keys["symbol"],
            }
        )
    if fingerprint is not None:
        check_dataset({str(r["dir"]): r["info"].get("dataset_fingerprint") for r in run_list}, fingerprint, dataset)

    out = Path(output_dir)
    with staged_files(out) as stage:  # all outputs or none
        tables = {
            "s3_hidden_in_degree.csv": hid_in_rows,
            "s3_target_in_degree.csv": tg_rows,
            "s3_landmark_out_degree.csv": lm_rows,
            "s3_hidden_out_degree.csv": hid_out_rows,
        }
        for fname, rows in tables.items():
            _write_csv(pd.concat(rows, ignore_index=True), stage / fname)
        name = _arch_name((layers, units, dropout))
        scope_text = (
            "per input unit (a landmark's weights to all hidden units) and per output unit (a target's weights "
            "from all hidden units)"
            if scope == "unit"
            else "over each whole weight matrix"
        )
        files = list(tables) + _figure_s3(tables, nets[0], sigmas, map_sigmas, map_size, name, stage, scope)
        n_nets, n_lm = len(nets), nets[0]["w_in"].shape[1]
        pooled = (
            f" (the hidden units and target genes of the {n_nets} target parts' networks pooled; each of the "
            f"{n_lm:,} landmarks counted once, with its major connections summed over the {n_nets} networks)"
            if n_nets > 1
            else ""
        )
        caption = (
            f"Supplementary Figure S3. Major weights of {name} (model selected by {selection}): weights more "
            f"than k standard deviations from the mean, with mean and standard deviation taken {scope_text}. "
            f"Top (a-d): for each k in {', '.join(f'{k:g}' for k in sigmas)}, the number of major connections "
            f"per hidden unit (from landmarks / to targets), per landmark and per target gene{pooled}. "
            f"Bottom (e, f): map of the standardised weights (weight minus mean, in standard deviations; red "
            f"positive, blue negative, saturated at ±k) with the major connections marked + (positive) and − "
            f"(negative); input k = {map_sigmas[0]:g}, output k = {map_sigmas[1]:g} as in the paper; the "
            f"{min(map_size, units)} hidden units with the most major connections of target part "
            f"{nets[0]['part']} (hubs first) and the genes most connected to them."
        )
        shown = next(c for c in counts if c.get("map") and c["part"] == nets[0]["part"])
        empty = [
            f"no major {side} connections at k = {k:g}"
            for side, k, n in (
                ("input", map_sigmas[0], shown["input_connections"]),
                ("output", map_sigmas[1], shown["output_connections"]),
            )
            if n == 0
        ]
        if empty:  # no mark on the map is a result (no weight beyond k standard deviations), not a drawing error
            caption += f" Part {nets[0]['part']} has {' and '.join(empty)}, so the map marks none there."
        info = {
            "analysis": "S3",
            "network": _network_info(run_list, selection),
            "sigmas": sigmas,
            "map_sigmas": {"input": map_sigmas[0], "output": map_sigmas[1]},
            "scope": scope,
            "threshold": "|w - mean| > k * std, " + scope_text,
            "counts": counts,
            "files": files + ["s3.json"],
            "captions": {
                "figure_s3": caption,
                "s3_hidden_in_degree": "Major input connections (from landmarks) per hidden unit, by part and k.",
                "s3_hidden_out_degree": "Major output connections (to targets) per hidden unit, by part and k; "
                "units with many are the paper's 'hub units'.",
                "s3_landmark_out_degree": "Major connections per landmark gene (to hidden units), by part and k.",
                "s3_target_in_degree": "Major connections per target gene (from hidden units), by part and k.",
            },
        }
        write_json(stage / "s3.json", info)
    m = next(c for c in counts if c.get("map"))
    log.info(
        "S3 %s part %s (k=%g/%g): %d/%d hidden units with major input, %d with major output, "
        "%d hubs carry half of the output connections",
        name,
        m["part"],
        *map_sigmas,
        m["hidden_with_major_input"],
        m["hidden_units"],
        m["hidden_with_major_output"],
        m["hubs_for_half_of_output_connections"],
    )
    return info


def _gene_keys(table: pd.DataFrame | None, ids: list[str], probe_ids: bool | None) -> dict:
    """The :data:`~dgex.genes.ID_COLUMNS` of each network gene ``ids`` (unique ids), from the dataset's ``table``."""
    keys = pd.DataFrame({"ensembl": [str(i) for i in ids]})
    info = table.drop_duplicates("ensembl").set_index("ensembl") if table is not None else None
    for col in ("entrez", "symbol"):
        found = info[col].reindex(keys["ensembl"]) if info is not None and col in info else None
        keys[col] = found.fillna("").astype(str).to_numpy() if found is not None else ""
    return {c: v.tolist() for c, v in split_gene_ids(keys, probe_ids)[ID_COLUMNS].items()}


def _degree_frame(part, k: float, keys: dict, degrees, total_name: str) -> pd.DataFrame:
    total, pos, neg = degrees
    n = len(total)
    return pd.DataFrame(
        {"part": [part] * n, "sigma": k, **keys, total_name: total, "n_positive": pos, "n_negative": neg}
    )


def _standardised(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``(w - mean) / std`` with the statistics :func:`major_weights` thresholds (0 where a unit is constant)."""
    mean = w.mean(axis=axis, keepdims=True)
    std = w.std(axis=axis, keepdims=True)
    return (w - mean) / np.where(std > 0, std, 1.0)


# one style per k: grey level and hatch differ, so the bars separate in colour and in grey-scale
K_STYLES = [("#3b3b3b", ""), ("#bdbdbd", "////"), ("#ffffff", "...."), ("#7f7f7f", "xx")]


def _degree_hist(ax, by_k: list[tuple[float, np.ndarray]], xlabel: str, ylabel: str, title: str) -> None:
    """Grouped bars of integer degrees, one bar per k at each count (log y, so rare high degrees show).

    ``by_k`` holds, for each k, the degrees ``(n_units,)``.  Up to 40 distinct counts get one bar each;
    wider ranges are binned into 40 bins.
    """
    from matplotlib.ticker import MaxNLocator

    top = max((int(v.max()) for _, v in by_k if v.size), default=0)
    edges = np.arange(-0.5, top + 1.5) if top < 40 else np.linspace(-0.5, top + 0.5, 41)
    width = np.diff(edges)
    bar = 0.85 * width / len(by_k)
    all_zero = []
    for i, (k, v) in enumerate(by_k):
        counts, _ = np.histogram(v, edges)
        x = edges[:-1] + 0.075 * width + bar * (i + 0.5)
        keep = counts > 0
        color, hatch = K_STYLES[i % len(K_STYLES)]
        ax.bar(
            x[keep],
            counts[keep],
            width=bar[keep],
            color=color,
            hatch=hatch,
            edgecolor="black",
            linewidth=0.5,
            label=f"k = {k:g}",
        )
        if v.size and not v.any():
            all_zero.append(f"{k:g}")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)
    ax.set_xlim(edges[0] - 0.1, max(edges[-1], 1.5))  # a lone bar at 0 still sits on a readable axis
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if all_zero:  # said in the title, off the bars
        title += f"\nall 0 at k = {', '.join(all_zero)}"
    ax.set_title(title)


def _figure_s3(
    tables: dict,
    net: dict,
    sigmas: list[float],
    map_sigmas: list[float],
    map_size: int,
    name: str,
    out: Path,
    scope: str = "unit",
) -> list[str]:
    plt = pyplot()
    frames = {f: pd.concat(rows, ignore_index=True) for f, rows in tables.items()}
    # landmarks are shared by every part's network: count each once, its connections summed over the networks
    lm = frames["s3_landmark_out_degree.csv"]
    n_parts = lm["part"].astype(str).nunique()
    lm = lm.groupby(["sigma", "id"], sort=False, as_index=False)["n_hidden"].sum()
    frames["s3_landmark_out_degree.csv"] = lm
    net_word = f"\n(summed over the {n_parts} parts' networks)" if n_parts > 1 else ""
    panels = [
        ("s3_hidden_in_degree.csv", "n_landmarks", "major inputs per hidden unit", "number of hidden units"),
        ("s3_landmark_out_degree.csv", "n_hidden", "major outputs per landmark" + net_word, "number of landmarks"),
        ("s3_hidden_out_degree.csv", "n_targets", "major outputs per hidden unit", "number of hidden units"),
        ("s3_target_in_degree.csv", "n_hidden", "major inputs per target gene", "number of target genes"),
    ]
    titles = ["(a) landmarks → hidden unit", "(b) landmark → hidden units", "(c) hidden unit → targets"]
    titles.append("(d) hidden units → target gene")
    fig = plt.figure(figsize=(13, 9), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.7])  # own layouts: the maps' colour bars stay below
    for j, (fname, col, xlabel, ylabel) in enumerate(panels):
        ax = top.add_subplot(1, 4, j + 1)
        df = frames[fname]
        by_k = [(k, df.loc[df["sigma"] == k, col].to_numpy()) for k in sigmas]
        _degree_hist(ax, by_k, xlabel, ylabel, titles[j])
    # the k legend sits in the title row, above the bars
    top.legend(*ax.get_legend_handles_labels(), loc="outside upper right", ncols=len(sigmas), frameon=False)

    # map of the units with the most major connections (input at k_in, output at k_out), hubs first
    d = net["d"]
    z_in = _standardised(net["w_in"], 0 if scope == "unit" else None)  # (H, L)
    z_out = _standardised(net["w_out"], 1 if scope == "unit" else None)  # (T, H)
    n_major = d["hidden_in"][0] + d["hidden_out"][0]
    strength = np.maximum(np.abs(z_in).max(axis=1), np.abs(z_out).max(axis=0))  # orders units without majors
    units = np.lexsort((-strength, -n_major))[:map_size]
    units = units[np.argsort(-d["hidden_out"][0][units], kind="stable")]
    maps = [
        ("(e) landmarks → hidden units", z_in[units].T, d["mask_in"][units].T, "landmark", map_sigmas[0]),
        ("(f) hidden units → targets", z_out[:, units], d["mask_out"][:, units], "target", map_sigmas[1]),
    ]
    for title, z, mask, gene, k in maps:
        rows = np.lexsort((-np.abs(z).max(axis=1), -mask.sum(axis=1)))[:map_size]  # (n_rows,) most connected
        z, mask = z[rows], mask[rows]
        ax = bottom.add_subplot(1, 2, 1 if gene == "landmark" else 2)
        im = ax.imshow(np.clip(z, -k, k), aspect="auto", interpolation="nearest", cmap="RdBu_r", vmin=-k, vmax=k)
        # + / - marks keep the sign of a major weight readable in grey-scale
        for sign, marker in ((1, "+"), (-1, "_")):
            yy, xx = np.nonzero(mask & (np.sign(z) == sign))
            ax.scatter(xx, yy, marker=marker, s=16, linewidths=1.0, color="white")
        ax.set_xlabel(f"hidden unit (rank of {len(units)}, hubs first)")
        ax.set_ylabel(f"{gene} genes (rank of the {len(rows)} most connected)")
        ax.set_title(f"{title}: {int(mask.sum())} major weights shown (k = {k:g}), part {net['part']}")
        cb = bottom.colorbar(im, ax=ax, shrink=0.9, ticks=np.linspace(-k, k, 5))
        whose = f"{gene}'s" if scope == "unit" else "matrix"
        cb.set_label(f"weight − {whose} mean\n(standard deviations)")
    top.suptitle(f"Major weights of {name}", x=0.02, ha="left")
    return save_figure(fig, out, "figure_s3")
