"""Benchmark the baselines: closed-form multi-output LR / ridge vs scikit-learn one target at a time.

On seeded synthetic data shaped like the D-GEX problem (landmarks driven by a
few dozen latent factors, targets sparse-linear in the landmarks plus noise)
this times, in one run on this machine:

* LR: :func:`dgex.baselines.fit` (training statistics + one eigendecomposition
  + weights for all targets) vs ``sklearn.linear_model.LinearRegression``
  fitted per target (the "9,520 separate fits" approach) and, for context,
  one multi-output ``LinearRegression`` call;
* LR-L2: the whole ridge grid from one eigendecomposition vs ``Ridge`` per
  target and per lambda;
* KNN-GE (fit + validation curve over the k grid + prediction) and LR-L1
  (per-gene lasso path, default grid, ``--n-jobs`` threads).

Per-target scikit-learn fits are timed on a subset of targets (``--subset``,
default 200) and scaled linearly to all targets; the output says so.

    python bench/baselines.py                         # 4,000 x 943 -> 2,000 targets (~3-4 min on 2 cores)
    python bench/baselines.py --n-train 2000 --n-targets 500 --subset 50 --skip-lasso
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge

from dgex.baselines import KNN_KS, RIDGE_LAMBDAS, fit, lasso_lambdas
from dgex.metrics import per_gene_mae


def synthetic(n: int, n_landmarks: int, n_targets: int, seed: int, n_latent: int = 40):
    """Training and validation ``(X (n, L), Y (n, T))`` float32, roughly standardised."""
    rng = np.random.default_rng(seed)
    load = rng.normal(size=(n_latent, n_landmarks)) / np.sqrt(n_latent)
    B = rng.normal(size=(n_landmarks, n_targets)) * (rng.random((n_landmarks, n_targets)) < 0.05)
    B /= np.sqrt((B**2).sum(axis=0, keepdims=True) + 1e-12)

    def draw(m):
        X = rng.normal(size=(m, n_latent)) @ load + 0.5 * rng.normal(size=(m, n_landmarks))
        X = (X - X.mean(0)) / X.std(0)
        Y = X @ B * 0.8 + 0.5 * rng.normal(size=(m, n_targets))
        return X.astype(np.float32), Y.astype(np.float32)

    return draw(n), draw(max(200, n // 4))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=4000, help="training profiles (default 4000)")
    ap.add_argument("--n-landmarks", type=int, default=943, help="landmark genes (default 943)")
    ap.add_argument("--n-targets", type=int, default=2000, help="target genes (default 2000)")
    ap.add_argument("--subset", type=int, default=200, help="targets fitted one at a time by sklearn (default 200)")
    ap.add_argument("--n-jobs", type=int, default=2, help="threads for LR-L1 (default 2)")
    ap.add_argument("--skip-lasso", action="store_true", help="do not time LR-L1")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    (X, Y), (Xv, Yv) = synthetic(args.n_train, args.n_landmarks, args.n_targets, args.seed)
    n, L = X.shape
    T = Y.shape[1]
    sub = np.arange(min(args.subset, T))
    scale = T / len(sub)
    X64 = X.astype(np.float64)
    print(
        f"dgex baselines benchmark: n_train {n}, {L} landmarks, {T} targets, validation {len(Xv)}; "
        f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}"
    )
    print(
        f"scikit-learn one-target-at-a-time fits are timed on {len(sub)} targets and scaled x{scale:.1f} "
        f"to {T} (linear in the number of targets)\n"
    )
    rows = []

    # ---- LR
    t_lr, lr = timed(lambda: fit("lr", X, Y))
    t_lr_w, (W, b) = timed(lambda: lr.weights(0))
    t_lr += t_lr_w
    t_one, refs = timed(lambda: [LinearRegression().fit(X64, Y[:, j]) for j in sub])
    t_sk_lr = t_one * scale
    t_multi, multi = timed(lambda: LinearRegression().fit(X64, Y))
    diff = max(np.abs(W[:, j] - r.coef_).max() for j, r in zip(sub, refs))
    rows.append(("LR, closed form (dgex)", t_lr, ""))
    rows.append(("LR, sklearn per target (scaled)", t_sk_lr, f"speed-up {t_sk_lr / t_lr:.1f}x"))
    rows.append(("LR, sklearn one multi-output call", t_multi, f"ratio {t_multi / t_lr:.1f}x"))
    print(f"LR max |coef - sklearn| on the subset: {diff:.2e}")

    # ---- ridge: the whole grid
    grid = list(RIDGE_LAMBDAS)

    def ridge_grid():
        fam = fit("ridge", X, Y, grid)
        return fam, [fam.weights(i)[0] for i in range(len(grid))]

    t_ridge, (ridge, Ws) = timed(ridge_grid)
    lam = grid[len(grid) // 2]
    t_one, rrefs = timed(lambda: [Ridge(alpha=n * lam).fit(X64, Y[:, j]) for j in sub])
    t_sk_ridge1 = t_one * scale
    t_sk_ridge = t_sk_ridge1 * len(grid)
    diff = max(np.abs(Ws[len(grid) // 2][:, j] - r.coef_).max() for j, r in zip(sub, rrefs))
    rows.append((f"LR-L2, closed form, {len(grid)} lambdas (dgex)", t_ridge, ""))
    rows.append(
        (
            f"LR-L2, sklearn per target x {len(grid)} lambdas (scaled)",
            t_sk_ridge,
            f"speed-up {t_sk_ridge / t_ridge:.1f}x",
        )
    )
    rows.append(
        (
            "LR-L2, sklearn per target, 1 lambda (scaled)",
            t_sk_ridge1,
            f"vs whole dgex grid {t_sk_ridge1 / t_ridge:.1f}x",
        )
    )
    print(f"LR-L2 max |coef - sklearn Ridge(alpha=n*{lam:g})| on the subset: {diff:.2e}")

    # ---- KNN-GE: fit + tuning curve over the k grid + prediction at the chosen k
    def knn():
        fam = fit("knn", X, Y, list(KNN_KS))
        curve = fam.curves({"va": (Xv, Yv)})["va"]
        i = int(np.argmin(curve))
        return fam, i, per_gene_mae(Yv, fam.predict(Xv, i)).mean()

    t_knn, (knn_fam, k_i, knn_mae) = timed(knn)
    rows.append(
        (f"KNN-GE fit + {len(KNN_KS)}-k curve + predict", t_knn, f"k={knn_fam.grid[k_i]}, va MAE {knn_mae:.4f}")
    )

    # ---- LR-L1
    if not args.skip_lasso:
        lgrid = list(lasso_lambdas(n, L))
        t_lasso, lasso = timed(lambda: fit("lasso", X, Y, lgrid, n_jobs=args.n_jobs))
        curve = lasso.curves({"va": (Xv, Yv)})["va"]
        i = int(np.argmin(curve))
        rows.append(
            (
                f"LR-L1 {len(lgrid)} lambdas, {args.n_jobs} thread(s)",
                t_lasso,
                f"{1000 * t_lasso / T:.1f} ms/target; lambda={lgrid[i]:.4g}, va MAE {curve[i]:.4f}",
            )
        )

    ridge_mae = min(ridge.curves({"va": (Xv, Yv)})["va"])
    lr_mae = per_gene_mae(Yv, lr.predict(Xv)).mean()
    print(f"validation MAE: LR {lr_mae:.4f}, best LR-L2 {ridge_mae:.4f}, best KNN-GE {knn_mae:.4f}\n")
    width = max(len(r[0]) for r in rows)
    for name, sec, note in rows:
        print(f"{name:<{width}}  {sec:8.2f} s  {note}")
    print(
        f"\nclosed-form speed-up vs per-target sklearn: LR {t_sk_lr / t_lr:.1f}x, "
        f"LR-L2 grid {t_sk_ridge / t_ridge:.1f}x (goal >= 5x)"
    )


if __name__ == "__main__":
    main()
