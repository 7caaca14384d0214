"""Stage ``baseline``: the paper's comparison methods LR, LR-L2, LR-L1 and KNN-GE.

Every method is trained on GEO-tr.  Its one global hyper-parameter (none for
LR) is chosen by the overall MAE (mean over all target genes) on a tuning set:
GEO-va for the GEO task and, when the dataset has it, 1000G-va for the
cross-platform task.  Each chosen model is then scored on every evaluation
split the dataset has (GEO-va, GEO-te, 1000G-va, GTEx-te), giving the same
``per_gene.csv`` schema as D-GEX runs (:data:`dgex.metrics.PER_GENE_COLUMNS`).

All four methods are linear maps ``yhat = X @ W + b`` with ``X``
``(n_samples, n_landmarks)`` and ``W`` ``(n_landmarks, n_targets)``, and all
are fitted from the same training statistics, accumulated once in row blocks
(:class:`TrainStats`: means, centred ``X'X``, ``X'Y`` and ``Y'Y`` diagonal):

* **LR** -- ordinary least squares with intercept, one multi-output solve via
  the eigendecomposition of the centred ``X'X`` (pseudo-inverse if singular).
* **LR-L2** (ridge) -- objective ``(1/n)|y - Xw - b|^2 + lam |w|^2`` per gene
  (sklearn ``Ridge(alpha = n_train * lam)``).  ``X'X = V diag(s) V'`` is
  decomposed once; each ``lam`` is then ``W = V diag(1/(s + n lam)) V'X'Y``, a
  matrix product.  Default grid: ``lam`` in ``logspace(-4, 2, 13)``
  (:data:`RIDGE_LAMBDAS`); with standardised landmarks the eigenvalues of
  ``X'X / n`` average 1, so the grid runs from negligible to heavy shrinkage
  at any training size.
* **LR-L1** (lasso) -- per gene, sklearn's objective
  ``(1/(2n))|y - Xw - b|^2 + lam |w|_1`` (``Lasso(alpha=lam)``), solved by
  ``sklearn.linear_model.lasso_path`` with the shared precomputed Gram matrix,
  warm-started from large to small ``lam``, in gene blocks on ``n_jobs``
  threads (the coordinate-descent solver releases the GIL).  Random
  coordinate selection (seeded per gene) converges several times faster than
  cyclic on correlated landmarks.  Default grid (:func:`lasso_lambdas`), 5
  values a factor 2 apart: ``lam0 * 2**-(i + 0.5)``, ``i = 0..4``, with
  ``lam0 = sqrt(2 ln(n_landmarks) / n_train)`` the universal threshold for
  unit-variance genes, so the grid shrinks like ``1/sqrt(n_train)`` as the
  optimal penalty does (demo data, n_train 1,600: 0.065 .. 0.0041, optimum
  inside).  The grid is short because the smallest penalty dominates the cost
  (many active landmarks, slow coordinate descent).
* **KNN-GE** -- for each target, the ``k`` landmark genes with the smallest
  Euclidean distance between gene vectors over the training profiles
  (``|a|^2 + |b|^2 - 2 a.b`` from the same statistics); the prediction is the
  mean of those landmarks, ``W`` a sparse averaging matrix and ``b = 0``.  The
  nearest ``max(k)`` are sorted once and every ``k`` of the grid
  (:data:`KNN_KS`) is scored from cumulative sums.

Outputs in ``OUTPUT_DIR``: ``per_gene.csv``, ``metrics.json`` (overall errors
per selected_by x split, with and without the targets that are also
landmarks), ``run.json`` (chosen values, validation curves, timings) and, for
each selection in ``run.json``'s ``tasks``, ``coefficients_<selection>.npz``:
the chosen model as ``weight`` float32 ``(n_landmarks, n_targets)``, ``bias``
float32 ``(n_targets,)`` and ``value`` (the chosen hyper-parameter, NaN for
LR), mapping the dataset's standardised landmarks to its standardised targets
(``yhat = x @ weight + bias``, the space of ``per_gene.csv``'s metrics;
:func:`load_coefficients` reads it back).
Everything is computed before the first file is written, and each file is
written atomically.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import linalg, sparse

from . import __version__
from .dataset import EVAL_SPLITS, SELECTIONS, ProcessedDataset
from .errors import ConfigError, InputError
from .io import atomic_path, refuse_overwriting_inputs, staged_files, write_json
from .metrics import overall, per_gene_frame, per_gene_mae, write_per_gene
from .settings import BaselineSettings

log = logging.getLogger(__name__)

#: Method key -> name in the ``method`` column (the paper's names).
METHODS = {"lr": "LR", "ridge": "LR-L2", "lasso": "LR-L1", "knn": "KNN-GE"}

#: Default ridge grid, per-sample ``lam`` (sklearn ``Ridge`` alpha = ``n_train * lam``).
RIDGE_LAMBDAS = tuple(float(v) for v in np.logspace(-4, 2, 13))
#: Default KNN-GE grid of k.
KNN_KS = (1, 2, 3, 5, 10, 15, 20, 30, 50, 100)
LASSO_STEPS = 5
LASSO_TOL = 1e-4  # sklearn's default: duality gap relative to |y|^2
LASSO_MAX_ITER = 1000
LASSO_BLOCK = 64  # genes per parallel task

#: Elements per float64 temporary in blocked loops (32 MiB).
_BLOCK_ELEMENTS = 1 << 22


def lasso_lambdas(n_train: int, n_landmarks: int, steps: int = LASSO_STEPS) -> tuple[float, ...]:
    """Default LR-L1 grid: ``sqrt(2 ln L / n) * 2**-(i + 0.5)`` for ``i = 0..steps-1``, ascending."""
    lam0 = math.sqrt(2.0 * math.log(max(n_landmarks, 2)) / max(n_train, 1))
    return tuple(sorted(lam0 * 2.0 ** -(i + 0.5) for i in range(steps)))


# --------------------------------------------------------------------------- #
# training statistics
# --------------------------------------------------------------------------- #
class TrainStats:
    """Sufficient statistics of the training set for every baseline (float64).

    ``mean_x`` ``(L,)``, ``mean_y`` ``(T,)``, centred ``xtx`` ``(L, L)``,
    ``xty`` ``(L, T)`` and ``yty`` ``(T,)`` (column sums of squares).
    """

    def __init__(self, X: np.ndarray, Y: np.ndarray):
        if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
            raise InputError(f"training X {X.shape} and Y {Y.shape} must be (n_samples, n_genes) with the same rows")
        if X.shape[0] < 2:
            raise InputError(f"{X.shape[0]} training profile(s); the baselines need at least 2")
        n, L = X.shape
        T = Y.shape[1]
        self.n, self.n_landmarks, self.n_targets = n, L, T
        self.mean_x = X.mean(axis=0, dtype=np.float64)
        self.mean_y = Y.mean(axis=0, dtype=np.float64)
        self.xtx = np.zeros((L, L))
        self.xty = np.zeros((L, T))
        self.yty = np.zeros(T)
        # centre with the exact means before multiplying (better than subtracting n*mu*mu' afterwards);
        # row blocks bound the float64 temporaries
        rows = max(1, _BLOCK_ELEMENTS // (L + T))
        for s in range(0, n, rows):
            xb = X[s : s + rows] - self.mean_x
            yb = Y[s : s + rows] - self.mean_y
            self.xtx += xb.T @ xb
            self.xty += xb.T @ yb
            self.yty += np.einsum("ij,ij->j", yb, yb)

    def intercept(self, W) -> np.ndarray:
        """Intercept ``(T,)`` that goes with centred-data weights ``W`` ``(L, T)``."""
        return self.mean_y - np.asarray(W.T @ self.mean_x).ravel()


def _predict(X: np.ndarray, W, b: np.ndarray) -> np.ndarray:
    """``X @ W + b`` for dense or sparse ``W``: ``(n_samples, n_targets)`` float64."""
    if sparse.issparse(W):
        out = np.asarray((W.T @ X.T.astype(np.float64)).T)
    else:
        out = X.astype(np.float64) @ np.ascontiguousarray(W)  # numpy falls back to a slow loop on strided W
    out += b
    return out


# --------------------------------------------------------------------------- #
# fitted model families: one linear map per grid value
# --------------------------------------------------------------------------- #
class Family:
    """A baseline fitted for every value of its grid; ``weights(i)`` gives ``(W, b)``."""

    param: str | None = None

    def __init__(self, stats: TrainStats, grid):
        self.stats = stats
        self.grid = list(grid)
        self.info: dict = {}

    def weights(self, i: int):
        raise NotImplementedError

    def predict(self, X: np.ndarray, i: int = 0) -> np.ndarray:
        """Predictions ``(n_samples, n_targets)`` for grid value ``i``."""
        W, b = self.weights(i)
        return _predict(X, W, b)

    def curves(self, tuning: dict) -> dict:
        """Overall MAE for each grid value on each tuning set: ``{split: (n_grid,)}``.

        ``tuning`` maps split names to ``(X, Y)``.
        """
        out = {name: np.empty(len(self.grid)) for name in tuning}
        for i in range(len(self.grid)):
            W, b = self.weights(i)
            for name, (X, Y) in tuning.items():
                out[name][i] = per_gene_mae(Y, _predict(X, W, b)).mean()
        return out


class _Spectral(Family):
    """LR and ridge from one eigendecomposition ``X'X = V diag(s) V'`` (centred)."""

    def __init__(self, stats: TrainStats, grid):
        super().__init__(stats, grid)
        s, V = linalg.eigh(stats.xtx)
        self.s, self.V = s, V
        self.A = V.T @ stats.xty  # (L, T): X'Y in the eigenbasis, shared by every lambda

    def _scale(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def weights(self, i: int):
        W = self.V @ (self.A * self._scale(i)[:, None])
        return W, self.stats.intercept(W)

    def curves(self, tuning: dict) -> dict:
        # rotate each tuning set once; then every lambda costs one (n, L) x (L, T) product
        rotated = {name: ((X - self.stats.mean_x) @ self.V, Y) for name, (X, Y) in tuning.items()}
        out = {name: np.empty(len(self.grid)) for name in tuning}
        for i in range(len(self.grid)):
            B = self.A * self._scale(i)[:, None]
            for name, (Z, Y) in rotated.items():
                out[name][i] = per_gene_mae(Y, Z @ B + self.stats.mean_y).mean()
        return out


class LinearRegression(_Spectral):
    """Ordinary least squares with intercept for all targets at once (min-norm if ``X'X`` is singular)."""

    def __init__(self, stats: TrainStats):
        super().__init__(stats, [None])
        # eigenvalues below roundoff of X'X are treated as zero (pseudo-inverse)
        cutoff = max(self.s.max(), 0.0) * stats.n_landmarks * np.finfo(np.float64).eps
        keep = self.s > cutoff
        self._inv = np.where(keep, 1.0 / np.where(keep, self.s, 1.0), 0.0)
        self.info = {"rank": int(keep.sum()), "condition_number": _num(self.s.max() / self.s[keep].min())}
        if keep.sum() < stats.n_landmarks:
            log.warning(
                "LR: X'X has rank %d < %d landmarks; using the minimum-norm solution", keep.sum(), stats.n_landmarks
            )

    def _scale(self, i: int) -> np.ndarray:
        return self._inv


class RidgeRegression(_Spectral):
    """Ridge for every ``lam`` of the grid: ``W = V diag(1/(s + n lam)) V' X'Y``."""

    param = "lambda"

    def _scale(self, i: int) -> np.ndarray:
        return 1.0 / (self.s + self.stats.n * self.grid[i])


class LassoRegression(Family):
    """Per-gene lasso path over the grid (sklearn ``lasso_path``, shared Gram matrix)."""

    param = "lambda"

    def __init__(
        self,
        stats: TrainStats,
        X: np.ndarray,
        Y: np.ndarray,
        grid,
        n_jobs: int = 1,
        progress: bool = False,
        block: int = LASSO_BLOCK,
    ):
        super().__init__(stats, grid)
        from joblib import Parallel, delayed
        from sklearn.exceptions import ConvergenceWarning
        from tqdm.auto import tqdm

        L, T = stats.n_landmarks, stats.n_targets
        # with the Gram matrix and X'y given, lasso_path reads only X's shape and dtype (and y only for |y|^2);
        # the real centred X is passed anyway so that a solver change in sklearn cannot silently go wrong
        Xc = np.asfortranarray(X - stats.mean_x, dtype=np.float64)
        gram = np.ascontiguousarray(stats.xtx)
        alphas = np.array(sorted(self.grid, reverse=True))

        def fit_block(sl: slice):
            yc = np.asfortranarray(Y[:, sl] - stats.mean_y[sl], dtype=np.float64)
            xy = np.ascontiguousarray(stats.xty[:, sl].T)  # (genes, L): one contiguous row per gene
            coefs = np.empty((len(alphas), L, yc.shape[1]))
            capped = np.zeros(len(alphas), dtype=np.int64)
            for j in range(yc.shape[1]):
                _, c, _, n_iter = _lasso_path(Xc, yc[:, j], xy[j], gram, alphas)
                coefs[:, :, j] = c.T
                capped += np.asarray(n_iter) >= LASSO_MAX_ITER
            return sl, coefs, capped

        blocks = [slice(s, min(T, s + block)) for s in range(0, T, block)]
        self.coefs = np.empty((len(alphas), L, T))  # alphas in descending order; each W contiguous
        capped = np.zeros(len(alphas), dtype=np.int64)
        with warnings.catch_warnings():
            # non-convergence is counted and reported once instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            jobs = Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator_unordered")(
                delayed(fit_block)(sl) for sl in blocks
            )
            for sl, c, k in tqdm(
                jobs, total=len(blocks), desc="LR-L1 gene blocks", unit="block", disable=not progress, leave=False
            ):
                self.coefs[:, :, sl] = c
                capped += k
        self._order = {float(a): i for i, a in enumerate(alphas)}
        self.info = {
            "not_converged": {f"{a:.6g}": int(k) for a, k in zip(alphas, capped)},
            "tol": LASSO_TOL,
            "max_iter": LASSO_MAX_ITER,
            "selection": "random",
        }
        if capped.any():
            log.warning(
                "LR-L1: %d gene x lambda fits stopped at max_iter=%d before the tolerance",
                int(capped.sum()),
                LASSO_MAX_ITER,
            )

    def weights(self, i: int):
        W = self.coefs[self._order[float(self.grid[i])]]
        return W, self.stats.intercept(W)


def _lasso_path(Xc, y, xy, gram, alphas):
    from sklearn.linear_model import lasso_path

    return lasso_path(
        Xc,
        y,
        alphas=alphas,
        precompute=gram,
        Xy=xy,
        check_input=False,
        return_n_iter=True,
        tol=LASSO_TOL,
        max_iter=LASSO_MAX_ITER,
        selection="random",
        random_state=0,
    )


class KNNGE(Family):
    """Gene-based KNN: each target is the mean of its ``k`` nearest landmark genes."""

    param = "k"

    def __init__(self, stats: TrainStats, grid):
        super().__init__(stats, grid)
        n, L, T = stats.n, stats.n_landmarks, stats.n_targets
        kmax = max(self.grid)
        # uncentred squared norms and cross products of the gene vectors over training profiles
        sq_x = np.diag(stats.xtx) + n * stats.mean_x**2
        sq_y = stats.yty + n * stats.mean_y**2
        self.neighbours = np.empty((kmax, T), dtype=np.int64)  # nearest first
        self.distances = np.empty((kmax, T))
        width = max(1, _BLOCK_ELEMENTS // L)
        for s in range(0, T, width):
            sl = slice(s, min(T, s + width))
            cross = stats.xty[:, sl] + n * np.outer(stats.mean_x, stats.mean_y[sl])
            d2 = np.maximum(sq_x[:, None] + sq_y[sl] - 2.0 * cross, 0.0)  # (L, block); clip roundoff
            if kmax < L:
                near = np.argpartition(d2, kmax - 1, axis=0)[:kmax]
            else:
                near = np.broadcast_to(np.arange(L)[:, None], d2.shape)
            dist = np.take_along_axis(d2, near, axis=0)
            order = np.lexsort((near, dist), axis=0)  # by distance, ties by landmark index
            self.neighbours[:, sl] = np.take_along_axis(near, order, axis=0)
            self.distances[:, sl] = np.sqrt(np.take_along_axis(dist, order, axis=0))

    def weights(self, i: int):
        k, T = int(self.grid[i]), self.stats.n_targets
        rows = self.neighbours[:k].ravel()
        cols = np.tile(np.arange(T), k)
        S = sparse.csc_matrix((np.full(k * T, 1.0 / k), (rows, cols)), shape=(self.stats.n_landmarks, T))
        return S, np.zeros(T)

    def curves(self, tuning: dict) -> dict:
        # all k at once: add the j-th nearest landmark to a running sum, score when j+1 is in the grid
        out = {name: np.empty(len(self.grid)) for name in tuning}
        where = {int(k): i for i, k in enumerate(self.grid)}
        for name, (X, Y) in tuning.items():
            total = np.zeros((X.shape[0], self.stats.n_targets))
            for j in range(max(self.grid)):
                total += X[:, self.neighbours[j]]
                if j + 1 in where:
                    out[name][where[j + 1]] = per_gene_mae(Y, total / (j + 1)).mean()
        return out


def fit(
    method: str,
    X: np.ndarray,
    Y: np.ndarray,
    grid=None,
    *,
    n_jobs: int = 1,
    progress: bool = False,
    stats: TrainStats | None = None,
) -> Family:
    """Fit baseline ``method`` on ``X`` ``(n, L)``, ``Y`` ``(n, T)`` for every value of ``grid``.

    ``grid`` is the list of ``lam`` (ridge, lasso) or ``k`` (knn); None takes
    the default; LR has none.  Returns a :class:`Family`.
    """
    grid = check_grid(method, grid, n_train=X.shape[0], n_landmarks=X.shape[1])
    stats = stats if stats is not None else TrainStats(X, Y)
    if method == "lr":
        return LinearRegression(stats)
    if method == "ridge":
        return RidgeRegression(stats, grid)
    if method == "lasso":
        return LassoRegression(stats, X, Y, grid, n_jobs=n_jobs, progress=progress)
    return KNNGE(stats, grid)


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #
def check_method(method: str) -> str:
    if method not in METHODS:
        raise ConfigError(f"unknown baseline method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_grid(method: str, grid, n_train: int, n_landmarks: int) -> list:
    """The validated, sorted grid of ``method`` (default if ``grid`` is None)."""
    check_method(method)
    if method == "lr":
        if grid is not None:
            raise ConfigError("lr has no hyper-parameter; drop --lambdas/--ks (use ridge or lasso for a penalty)")
        return [None]
    if grid is None:
        if method == "ridge":
            return list(RIDGE_LAMBDAS)
        if method == "lasso":
            return list(lasso_lambdas(n_train, n_landmarks))
        grid = [k for k in KNN_KS if k <= n_landmarks] or [n_landmarks]
    values = list(grid)
    if not values:
        what = "--ks" if method == "knn" else "--lambdas"
        raise ConfigError(f"{what} is empty; give at least one value or leave it out for the default grid")
    if method == "knn":
        if any(not float(k).is_integer() for k in values) or min(values) < 1:
            raise ConfigError(f"--ks must be whole numbers >= 1, got {values}; e.g. --ks 1 5 10")
        values = sorted({int(k) for k in values})
        if values[-1] > n_landmarks:
            raise ConfigError(
                f"k={values[-1]} exceeds the {n_landmarks} landmark genes; use --ks values <= {n_landmarks}"
            )
        return values
    values = [float(v) for v in values]
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--lambdas must be finite and > 0, got {values}; use lr for lambda = 0")
    return sorted(set(values))


def coefficients_name(selection: str) -> str:
    """File name of the coefficients a baseline chose by ``selection`` (``geo-va`` or ``1000g-va``)."""
    return f"coefficients_{selection}.npz"


def write_coefficients(path, W, b, value) -> None:
    """Write one chosen linear map atomically: ``weight`` ``(L, T)`` and ``bias`` ``(T,)`` float32, ``value``."""
    W = W.toarray() if sparse.issparse(W) else np.asarray(W)  # KNN-GE: sparse averaging matrix
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: np.savez would append .npz to a name
        np.savez(
            fh,
            weight=W.astype(np.float32),
            bias=np.asarray(b).astype(np.float32),
            value=np.float64(np.nan if value is None else value),
        )


def load_coefficients(path) -> tuple[np.ndarray, np.ndarray, float]:
    """``(weight (L, T), bias (T,), value)`` of a ``coefficients_<selection>.npz`` (:func:`write_coefficients`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            W, b, value = z["weight"], z["bias"], float(z["value"])
    except FileNotFoundError:
        raise InputError(f"{path}: baseline coefficients not found; rerun `dgex baseline`") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: unreadable baseline coefficients ({exc}); rerun `dgex baseline`") from None
    if W.ndim != 2 or b.shape != (W.shape[1],) or not (np.isfinite(W).all() and np.isfinite(b).all()):
        raise InputError(
            f"{path}: weight {W.shape} and bias {b.shape} are not a finite (L, T) and (T,) pair; rerun `dgex baseline`"
        )
    return W, b, value


def _num(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def run_baseline(
    method: str, dataset, output_dir, *, lambdas=None, ks=None, n_jobs: int = -1, progress: bool = True
) -> dict:
    """Fit, tune and score one baseline; write ``per_gene.csv``, ``metrics.json`` and ``run.json``.

    ``lambdas`` (ridge, lasso) or ``ks`` (knn) replace the default grid.
    Returns the ``run.json`` content with the overall metrics under ``"metrics"``.
    """
    BaselineSettings.check(locals())
    t0 = time.time()
    check_method(method)
    name = METHODS[method]
    if method == "knn":
        if lambdas is not None:
            raise ConfigError("knn is tuned by --ks, not --lambdas; drop --lambdas")
        grid_arg = ks
    else:
        if ks is not None:
            raise ConfigError(f"{method} is tuned by --lambdas, not --ks; drop --ks")
        grid_arg = lambdas
    if n_jobs == 0:
        raise ConfigError("--n-jobs must be >= 1 (or negative for all cores but |n|-1), got 0")
    output_dir = Path(output_dir)
    outputs = ["per_gene.csv", "metrics.json", "run.json", *(coefficients_name(s) for s in SELECTIONS)]
    refuse_overwriting_inputs([output_dir / f for f in outputs], {"--dataset": dataset}, "--output-dir")

    with ProcessedDataset(dataset) as ds:
        for need in ("geo-tr", "geo-va"):
            if not ds.has(need):
                raise InputError(f"{dataset}: split {need} is missing; rerun `dgex preprocess` on GEO input")
        genes = ds.genes()
        targets = genes.targets
        n_train, n_landmarks = ds.n_samples("geo-tr"), len(genes.landmarks)
        grid = check_grid(method, grid_arg, n_train=n_train, n_landmarks=n_landmarks)  # fail before loading
        X, Y = ds.X("geo-tr"), ds.Y("geo-tr")
        evals = {s: (ds.X(s), ds.Y(s)) for s in EVAL_SPLITS if ds.has(s)}
        fingerprint = ds.fingerprint()["sha256"]
    timings = {"load": time.time() - t0}
    if len(targets) != Y.shape[1]:
        raise InputError(f"{dataset}: {len(targets)} target genes but Y has {Y.shape[1]} columns; rerun preprocess")

    t = time.time()
    family = fit(method, X, Y, grid_arg, n_jobs=n_jobs, progress=progress)
    timings["fit"] = time.time() - t
    del X, Y

    t = time.time()
    tuning = {s: evals[s] for s in SELECTIONS if s in evals}
    curves = family.curves(tuning)
    chosen = {s: int(np.argmin(curves[s])) for s in tuning}
    timings["tune"] = time.time() - t
    edge = {s: len(family.grid) > 1 and i in (0, len(family.grid) - 1) for s, i in chosen.items()}
    for s, i in chosen.items():
        log.info("%s selected by %s: %s = %s (MAE %.4f)", name, s, family.param, family.grid[i], curves[s][i])
        if edge[s]:
            log.warning(
                "%s: the %s chosen by %s is at the end of the grid; consider extending --%s",
                name,
                family.param,
                s,
                "ks" if method == "knn" else "lambdas",
            )

    t = time.time()
    frames, metrics, cache = [], {}, {}
    for sel, i in chosen.items():
        metrics[sel] = {}
        for split, (Xs, Ys) in evals.items():
            if (i, split) not in cache:  # both tasks may pick the same value
                cache[(i, split)] = per_gene_frame(targets, name, sel, split, Ys, family.predict(Xs, i))
            frame = cache[(i, split)].assign(selected_by=sel)
            frames.append(frame)
            metrics[sel][split] = {"all": overall(frame), "without_overlap": overall(frame, exclude_overlap=True)}
    per_gene = pd.concat(frames, ignore_index=True)
    timings["evaluate"] = time.time() - t
    timings["total"] = time.time() - t0

    sklearn_alpha = {"ridge": lambda v: v * family.stats.n, "lasso": lambda v: v}.get(method)
    tasks = {}
    for sel, i in chosen.items():
        tasks[sel] = {
            "chosen": family.grid[i],
            "chosen_index": i,
            "at_grid_edge": edge[sel],
            "tuning_mae": float(curves[sel][i]),
            "curve": [{"value": v, "mae": float(m)} for v, m in zip(family.grid, curves[sel])],
        }
        if sklearn_alpha:
            tasks[sel]["sklearn_alpha"] = sklearn_alpha(family.grid[i])
    summary = {
        "method": name,
        "method_key": method,
        "dgex_version": __version__,
        "dataset": str(dataset),
        "dataset_fingerprint": fingerprint,  # what aggregate compares: paths change when results move
        "hyper_parameter": family.param,
        "penalty_convention": {
            "ridge": "(1/n)|y - Xw - b|^2 + lambda |w|^2; sklearn Ridge alpha = n_train * lambda",
            "lasso": "(1/(2n))|y - Xw - b|^2 + lambda |w|_1; sklearn Lasso alpha = lambda",
        }.get(method),
        "grid": family.grid,
        "tasks": tasks,
        "n_train": int(family.stats.n),
        "n_landmarks": int(family.stats.n_landmarks),
        "n_genes": int(family.stats.n_targets),
        "n_overlap": int(targets["overlap"].sum()),
        "splits": {s: int(v[0].shape[0]) for s, v in evals.items()},
        "n_jobs": n_jobs,
        "details": family.info,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    with staged_files(output_dir) as stage:  # all outputs or none; run.json marks a complete run
        write_per_gene(stage / "per_gene.csv", per_gene)
        write_json(stage / "metrics.json", {"method": name, "metrics": metrics})
        for sel, i in chosen.items():
            W, b = family.weights(i)
            write_coefficients(stage / coefficients_name(sel), W, b, family.grid[i])
        write_json(stage / "run.json", summary)
    log.info("%s: wrote %s in %.1f s", name, output_dir, timings["total"])
    return {**summary, "metrics": metrics}
