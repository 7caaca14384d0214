"""Stage ``score-test-set``: every trained model scored on a prepared test set.

A test set (``test_sets/<set>/data.h5``, written by ``dgex prepare-test-set``)
holds landmarks and targets already brought into the model's space:
``landmarks`` ``(n_samples, n_landmarks)`` and ``targets``
``(n_samples, n_targets)``, standardised, in the gene order of the processed
dataset whose content fingerprint its ``dataset_fingerprint`` attribute names.
This stage predicts the targets from the landmarks with

* every D-GEX grid point, for each selection (``best_<selection>.pt`` of all
  its target parts, one batched forward pass per part), and
* every baseline, for each selection, from its fitted coefficients
  (``coefficients_<selection>.npz``: ``yhat = x @ weight + bias``),

and writes, under the results folder:

* ``test_sets/<set>/per_gene.csv`` -- per-gene MAE, Pearson r, Spearman rho
  (:data:`dgex.metrics.PER_GENE_COLUMNS`, ``split`` = the set's name, plus the
  architecture columns ``layers, units, dropout``);
* ``tables/test_set_<set>.csv|md`` -- per selection, every D-GEX architecture
  at the dropout rate chosen on validation (as :func:`dgex.tables.choose`
  chooses it) and every baseline: MAE mean +- std over genes, a percentile
  bootstrap 95% CI of the mean MAE from resampling test *samples* (genes are
  correlated, samples are the independent units), win rate and two-sided
  Wilcoxon signed-rank p of the per-gene MAEs against LR-L2 and against the
  best D-GEX;
* ``figures/test_set_<set>_scatter.png|pdf`` -- per-gene MAE of the best D-GEX
  against LR-L2, one panel per selection;
* ``test_sets/<set>/score.json`` -- the captions and file names, from which
  ``dgex collect-test-sets`` writes ``tables/test_sets.json`` for the report.

Every model must have been trained on the dataset the test set was prepared
against (its content fingerprint), or the scores would compare other genes
or statistics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from .aggregate import load_aggregate
from .baselines import coefficients_name, load_coefficients
from .checkpoints import load_weights
from .dataset import SELECTIONS, ProcessedDataset
from .errors import InputError
from .figures import gene_scatter
from .io import atomic_path, staged_files, write_json, write_text
from .metrics import PER_GENE_COLUMNS, bootstrap_ci, compare, overall, per_gene_frame
from .plotting import pyplot, save_figure
from .runs import check_dataset, load_runs, read_baseline_run, read_dgex_run
from .settings import ScoreSettings
from .tables import arch_name, choose, fmt

log = logging.getLogger(__name__)

#: Which task of :data:`dgex.tables.TASKS` chooses the D-GEX shown for each selection.
TASK_OF = {"geo-va": "geo", "1000g-va": "cross"}
#: The reference baseline every row is compared with.
REFERENCE = "LR-L2"
ARCH = ["layers", "units", "dropout"]
#: Rows predicted per forward pass (bounds the activations' memory, not a loop over samples).
CHUNK = 8192
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- #
# inputs
# --------------------------------------------------------------------------- #
def _fingerprint_attr(value, path: Path) -> str:
    """The SHA-256 of a ``dataset_fingerprint`` attribute (a hex string, or the JSON of a fingerprint)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                text = json.loads(text).get("sha256", "")
            except (ValueError, AttributeError):
                text = ""
        if re.fullmatch(r"[0-9a-fA-F]{64}", text or ""):
            return text.lower()
    raise InputError(
        f"{path}: attribute dataset_fingerprint is {value!r}, not a dataset's SHA-256; rerun `dgex prepare-test-set`"
    )


def read_test_set(path) -> dict:
    """A prepared test set: ``{"landmarks" (n, L), "targets" (n, T) float32, "sample_ids", "attrs", "fingerprint"}``."""
    path = Path(path)
    fix = "rerun `dgex prepare-test-set`"
    if not path.is_file():
        raise InputError(f"{path}: test set not found; {fix}")
    try:
        with h5py.File(path, "r") as h5:
            missing = [k for k in ("landmarks", "targets", "sample_ids") if k not in h5]
            if missing:
                raise InputError(f"{path}: not a prepared test set (no {', '.join(missing)}); {fix}")
            x = h5["landmarks"][()].astype(np.float32, copy=False)
            y = h5["targets"][()].astype(np.float32, copy=False)
            ids = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in h5["sample_ids"][()]])
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
    except OSError as exc:
        raise InputError(f"{path}: corrupt test set ({exc}); {fix}") from None
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or ids.shape != (x.shape[0],):
        raise InputError(
            f"{path}: landmarks {x.shape}, targets {y.shape} and sample_ids {ids.shape} do not match "
            f"((n, L), (n, T), (n,)); {fix}"
        )
    if x.shape[0] < 2:
        raise InputError(f"{path}: {x.shape[0]} sample(s); a test set needs at least 2 to score correlations")
    for what, a in (("landmarks", x), ("targets", y)):
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            raise InputError(
                f"{path}: {int(bad.sum())} sample(s) with NaN/infinite {what} (first {ids[np.argmax(bad)]}); {fix}"
            )
    if "dataset_fingerprint" not in attrs:
        raise InputError(f"{path}: no dataset_fingerprint attribute; {fix}")
    return {
        "landmarks": x,
        "targets": y,
        "sample_ids": ids,
        "attrs": attrs,
        "fingerprint": _fingerprint_attr(attrs["dataset_fingerprint"], path),
    }


def linear_map(run_dir, selection: str, n_landmarks: int, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
    """A baseline's linear map of one selection, checked against the dataset: ``weight`` ``(L, T)``, ``bias`` ``(T,)``."""
    path = Path(run_dir) / coefficients_name(selection)
    w, b, _ = load_coefficients(path)
    if w.shape != (n_landmarks, n_targets):
        raise InputError(
            f"{path}: weight {w.shape} does not map the dataset's {n_landmarks} landmarks to {n_targets} targets; "
            f"rerun `dgex baseline` on this dataset"
        )
    return w, b


# --------------------------------------------------------------------------- #
# predictions
# --------------------------------------------------------------------------- #
def predict_linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x @ weight + bias`` in float64: ``(n_samples, L) -> (n_samples, T)``."""
    return np.asarray(x, np.float64) @ np.asarray(weight, np.float64) + np.asarray(bias, np.float64)


def predict_dgex(parts: list[dict], x: np.ndarray, genes) -> np.ndarray:
    """Targets ``(n_samples, n_targets)`` float32 predicted by the part networks of one grid point.

    ``parts``: :func:`dgex.runs.load_runs`'s list (each with its ``checkpoint``); ``genes``: the dataset's
    :class:`~dgex.dataset.GeneTables`.  Each part fills its columns; every column must be covered once.
    """
    targets = genes.targets
    yhat = np.empty((x.shape[0], len(targets)), np.float32)
    covered = np.zeros(len(targets), bool)
    xt = torch.as_tensor(x)
    for p in parts:
        cols = slice(0, len(targets)) if p["part"] is None else genes.part_slice(p["part"])
        ids = {"landmarks": list(genes.landmarks["ensembl"]), "targets": list(targets["ensembl"][cols])}
        net, _ = load_weights(p["checkpoint"], n_in=x.shape[1], n_out=cols.stop - cols.start, gene_ids=ids)
        with torch.no_grad():
            yhat[:, cols] = torch.cat([net(xt[s : s + CHUNK]).float() for s in range(0, len(xt), CHUNK)]).numpy()
        covered[cols] = True
    if not covered.all():
        missing = sorted(set(targets["part"][~covered]))
        raise InputError(
            f"{parts[0]['dir'].parent}: no run of target part(s) {missing}; train every part of the grid point"
        )
    return yhat


def sample_errors(y: np.ndarray, yhat: np.ndarray) -> np.ndarray:
    """Mean absolute error of each sample over genes, ``(n_samples,)``.

    The mean over genes of the per-gene MAE equals the mean over samples of this,
    so resampling these values resamples the test samples of the overall error.
    """
    return np.abs(np.asarray(y, np.float64) - yhat).mean(axis=1)


# --------------------------------------------------------------------------- #
# the table
# --------------------------------------------------------------------------- #
def _label(method: str, arch) -> str:
    return method if arch is None else arch_name(arch)


def compare_rows(models: list[dict], selection: str, best, n_boot: int, seed: int) -> list[dict]:
    """One table row per model of one selection: errors, bootstrap CI, comparisons with LR-L2 and the best D-GEX.

    ``models``: ``{"method", "arch" (None for a baseline), "frame" (per-gene rows), "sample_err" (n_samples,)}``.
    """
    by_key = {(m["method"], m["arch"]): m for m in models}
    refs = {"lr_l2": by_key.get((REFERENCE, None)), "best_dgex": by_key.get(("D-GEX", best)) if best else None}
    rows = []
    for m in models:
        s = overall(m["frame"])
        lo, hi = bootstrap_ci(m["sample_err"], n_boot=n_boot, seed=seed)
        row = {
            "selected_by": selection,
            "method": m["method"],
            **dict(zip(ARCH, m["arch"] if m["arch"] else (None, None, None))),
            "model": _label(m["method"], m["arch"]),
            "best_dgex": m["method"] == "D-GEX" and m["arch"] == best,
            "n_samples": int(m["sample_err"].size),
            "n_genes": s["n_genes"],
            "mae_mean": s["mae_mean"],
            "mae_std": s["mae_std"],
            "mae_ci_low": lo,
            "mae_ci_high": hi,
            "r_mean": s["r_mean"],
            "rho_mean": s["rho_mean"],
        }
        for key, ref in refs.items():
            row[f"lower_mae_vs_{key}"] = row[f"wilcoxon_p_vs_{key}"] = None
            if ref is not None and ref is not m:
                a = m["frame"].set_index("ensembl")["mae"]
                b = ref["frame"].set_index("ensembl")["mae"].reindex(a.index)
                c = compare(a.to_numpy(), b.to_numpy())
                row[f"lower_mae_vs_{key}"], row[f"wilcoxon_p_vs_{key}"] = c["a_wins"], c["wilcoxon_p"]
        rows.append(row)
    return rows


def _p(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.2g}"


def _pct(v) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.1f}%"


def comparison_sentence(table: pd.DataFrame, selection: str) -> str:
    """The comparison of the best D-GEX with LR-L2 in plain words (no claim the numbers do not make)."""
    rows = table[table["selected_by"] == selection]
    best = rows[rows["best_dgex"]]
    if best.empty or not (rows["method"] == REFERENCE).any():
        return f"selected by {selection}: no D-GEX and LR-L2 pair to compare"
    b, r = best.iloc[0], rows[rows["method"] == REFERENCE].iloc[0]

    def mae(row) -> str:
        return f"MAE {fmt(row['mae_mean'])} [{fmt(row['mae_ci_low'])}, {fmt(row['mae_ci_high'])}]"

    return (
        f"{b['model']} ({mae(b)}) vs {REFERENCE} ({mae(r)}), selected by {selection}: lower MAE on "
        f"{_pct(b['lower_mae_vs_lr_l2'])} of genes, Wilcoxon p = {_p(b['wilcoxon_p_vs_lr_l2'])}"
    )


def table_markdown(table: pd.DataFrame, n_boot: int, seed: int, caption: str) -> str:
    """The test-set table as Markdown (``.3421 ± .0912`` style), headed by ``caption`` and the bootstrap settings."""
    lines = [
        f"**{caption}** MAE mean ± std over genes (standardised units), 95% percentile bootstrap "
        f"CI of the mean MAE from {n_boot} resamples of the test samples (seed {seed}); "
        f"the share of genes with a lower MAE and the two-sided Wilcoxon signed-rank p of the per-gene MAEs "
        f"against {REFERENCE} and against the best D-GEX (chosen on validation, ★).",
        "",
        "| selected by | model | MAE | 95% CI | r | ρ | lower vs LR-L2 | p vs LR-L2 | lower vs best D-GEX | "
        "p vs best D-GEX |",
        "|" + "---|" * 10,
    ]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['selected_by']} | {r['model']}{' ★' if r['best_dgex'] else ''} | "
            f"{fmt(r['mae_mean'], r['mae_std'])} | [{fmt(r['mae_ci_low'])}, {fmt(r['mae_ci_high'])}] | "
            f"{fmt(r['r_mean'])} | {fmt(r['rho_mean'])} | {_pct(r['lower_mae_vs_lr_l2'])} | "
            f"{_p(r['wilcoxon_p_vs_lr_l2'])} | {_pct(r['lower_mae_vs_best_dgex'])} | {_p(r['wilcoxon_p_vs_best_dgex'])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# the figure
# --------------------------------------------------------------------------- #
def scatter_figure(panels: list[dict], name: str, out: Path, file_name: str) -> tuple[list[str], str]:
    """Per-gene MAE of the best D-GEX (y) against LR-L2 (x), one panel per selection; returns (files, caption).

    ``panels``: ``{"selection", "model" (label), "x" (n_genes,), "y" (n_genes,)}``.
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.6), layout="constrained", squeeze=False)
    parts = []
    for ax, p, letter in zip(axes[0], panels, "abcd"):
        x, y = np.asarray(p["x"]), np.asarray(p["y"])
        gene_scatter(ax, x, y, REFERENCE, p["model"])
        win = float(np.mean(y < x))
        ax.set_title(f"({letter}) selected by {p['selection']}: D-GEX lower\non {100 * win:.1f}% of genes")
        parts.append(f"({letter}) {p['model']} selected by {p['selection']}, lower MAE on {100 * win:.1f}% of genes")
    fig.suptitle(f"Per-gene errors on test set {name}")
    caption = (
        f"Per-gene MAE on test set {name} of the best D-GEX (chosen on validation) against {REFERENCE}; points "
        f"below the diagonal are genes where D-GEX has the lower error: " + "; ".join(parts) + "."
    )
    return save_figure(fig, out, file_name), caption


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def _dgex_points(dirs) -> dict:
    """Run folders grouped by grid point ``(layers, units, dropout)``."""
    points: dict = {}
    for d in map(Path, dirs):
        points.setdefault(read_dgex_run(d)["arch"], []).append(d)
    return points


def score_test_set(
    *,
    test_set,
    dataset,
    aggregate,
    output_dir,
    dgex_runs=(),
    baseline_runs=(),
    name=None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Score every model on ``test_set``; writes the files of the module docstring under ``output_dir``.

    Returns the content of ``test_sets/<set>/score.json``.
    """
    ScoreSettings.check(locals())
    ts = read_test_set(test_set)
    name = name or str(ts["attrs"].get("name") or Path(test_set).parent.name)
    if not NAME_PATTERN.match(name):
        raise InputError(f"{test_set}: test set name {name!r} is not a plain name (letters, digits, . _ -)")
    if ts["attrs"].get("name") not in (None, name):
        raise InputError(
            f"{test_set}: holds test set {ts['attrs']['name']!r}, not {name!r}; pass the data.h5 of test set {name}"
        )
    with ProcessedDataset(dataset) as ds:
        genes, fp = ds.genes(), ds.fingerprint()["sha256"]
        selections = [s for s in SELECTIONS if ds.has(s)]
    if ts["fingerprint"] != fp:
        raise InputError(
            f"{test_set} was prepared against another dataset than {dataset} (its dataset_fingerprint differs); "
            f"prepare the test set again against this dataset"
        )
    x, y = ts["landmarks"], ts["targets"]
    L, T = len(genes.landmarks), len(genes.targets)
    if x.shape[1] != L or y.shape[1] != T:
        raise InputError(
            f"{test_set}: {x.shape[1]} landmarks and {y.shape[1]} targets, but {dataset} has {L} and {T}; "
            f"prepare the test set against this dataset"
        )
    where = f"the dataset {test_set} was prepared against"
    points = _dgex_points(dgex_runs)
    base_infos = {Path(d): read_baseline_run(d) for d in baseline_runs}
    recorded = {str(d): read_dgex_run(d).get("dataset_fingerprint") for ds_ in points.values() for d in ds_}
    recorded |= {str(d): i.get("dataset_fingerprint") for d, i in base_infos.items()}
    check_dataset(recorded, {"sha256": ts["fingerprint"]}, where)

    summary = load_aggregate(aggregate)["summary"]
    frames, table_rows, panels = [], [], []
    for sel in selections:
        models = []
        for arch, dirs in sorted(points.items()):
            yhat = predict_dgex(load_runs(dirs, sel), x, genes)
            models.append({"method": "D-GEX", "arch": arch, "yhat": yhat})
        for d, info in sorted(base_infos.items()):
            if sel not in (info.get("tasks") or {}):
                continue
            w, b = linear_map(d, sel, L, T)
            models.append({"method": info["method"], "arch": None, "yhat": predict_linear(x, w, b)})
        for m in models:
            yhat = m.pop("yhat")
            m["frame"] = per_gene_frame(genes.targets, m["method"], sel, name, y, yhat)
            m["sample_err"] = sample_errors(y, yhat)
            arch = m["arch"] or (np.nan, np.nan, np.nan)
            frames.append(m["frame"].assign(**dict(zip(ARCH, arch))))
        pick = choose(summary, TASK_OF[sel])
        best = (pick["layers"], pick["units"], pick["dropout"]) if pick else None
        if best is not None and not any(m["arch"] == best for m in models):
            raise InputError(
                f"{aggregate}: the D-GEX chosen on {sel} ({arch_name(best)}) is not among the runs given; "
                f"pass every run the aggregate holds"
            )
        # the paper's tables show every architecture at the dropout rate chosen on validation
        shown = [m for m in models if m["arch"] is None or (best is not None and m["arch"][2] == best[2])]
        table_rows += compare_rows(shown, sel, best, n_boot, seed)
        ref = next((m for m in models if m["method"] == REFERENCE), None)
        top = next((m for m in models if best is not None and m["arch"] == best), None)
        if ref is not None and top is not None:
            a, r = top["frame"].set_index("ensembl")["mae"], ref["frame"].set_index("ensembl")["mae"]
            panels.append({"selection": sel, "model": arch_name(best), "x": r.reindex(a.index), "y": a})
    if not panels:
        raise InputError(
            f"no best D-GEX and {REFERENCE} pair to compare on test set {name}: score needs D-GEX runs, their "
            f"aggregate and the ridge baseline run (baselines.methods must include ridge)"
        )
    per_gene = pd.concat(frames, ignore_index=True)
    per_gene[["layers", "units"]] = per_gene[["layers", "units"]].astype("Int64")
    table = pd.DataFrame(table_rows)
    table[["layers", "units"]] = table[["layers", "units"]].astype("Int64")
    caption = f"Test set {name} ({len(x)} samples; protocol {ts['attrs'].get('protocol', 'unknown')}): " + "; ".join(
        comparison_sentence(table, s) for s in selections if (table["selected_by"] == s).any()
    )
    caption += "."
    out = Path(output_dir)
    table_name, fig_name = f"test_set_{name}", f"test_set_{name}_scatter"
    with contextlib.ExitStack() as stack:  # all files or none
        set_dir = stack.enter_context(staged_files(out / "test_sets" / name))
        tables = stack.enter_context(staged_files(out / "tables"))
        figures = stack.enter_context(staged_files(out / "figures"))
        with atomic_path(set_dir / "per_gene.csv") as tmp:
            per_gene[PER_GENE_COLUMNS + ARCH].to_csv(tmp, index=False, float_format="%.8g")
        with atomic_path(tables / f"{table_name}.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6g")
        write_text(tables / f"{table_name}.md", table_markdown(table, n_boot, seed, caption))
        files, fig_caption = scatter_figure(panels, name, figures, fig_name)
        info = {
            "name": name,
            "caption": caption,
            "table": f"tables/{table_name}.csv",
            "figures": [{"png": f"figures/{files[0]}", "pdf": f"figures/{files[1]}", "caption": fig_caption}],
            "n_samples": int(len(x)),
            "protocol": ts["attrs"].get("protocol"),
            "source": ts["attrs"].get("source"),
            "bootstrap": {"resamples": n_boot, "seed": seed, "level": 0.95, "unit": "test samples"},
            "chosen": {s: choose(summary, TASK_OF[s]) for s in selections},
        }
        write_json(set_dir / "score.json", info)
    log.info("scored %d models x %d selections on test set %s", len(points) + len(base_infos), len(selections), name)
    return info


#: Keys of each entry of ``tables/test_sets.json`` (the report renders them).
ENTRY_KEYS = ("name", "caption", "table", "figures")


def collect_test_sets(*, scores, output) -> dict:
    """``tables/test_sets.json`` from the ``score.json`` of every test set, in the order given."""
    entries = []
    for path in map(Path, scores):
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: not found; run `dgex score-test-set` first") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: corrupt score file ({exc}); rerun `dgex score-test-set`") from None
        if not isinstance(info, dict) or any(k not in info for k in ENTRY_KEYS):
            raise InputError(f"{path}: not written by `dgex score-test-set` (keys {', '.join(ENTRY_KEYS)})")
        entries.append({k: info[k] for k in ENTRY_KEYS})
    doc = {"test_sets": entries}
    write_json(output, doc)
    return doc
