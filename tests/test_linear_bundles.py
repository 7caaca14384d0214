"""Linear models as bundles (issue 13): the baselines' kept coefficients and `dgex export` of LR / LR-L2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LinearRegression, Ridge

from dgex.baselines import load_coefficients, run_baseline
from dgex.metrics import read_per_gene
from helpers_dataset import write_toy_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    # few noisy training profiles: every tuned baseline chooses a value inside its grid (ridge lambda 0.32,
    # lasso the 4th of 5, k = 2), so a file holding another grid value than the chosen one is caught
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "ds.h5", n_tr=40, n_landmarks=20, n_targets=30, noise=1.0)


@pytest.fixture(scope="module")
def baseline_runs(toy, tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    for method in ("lr", "ridge", "lasso", "knn"):
        run_baseline(method, toy["path"], root / method, n_jobs=1, progress=False)
    return root


def _oracle_metrics(y: np.ndarray, yhat: np.ndarray) -> dict:
    """Per-gene MAE, Pearson r and Spearman rho by scipy, one gene at a time."""
    cols = range(y.shape[1])
    return {
        "mae": np.abs(y - yhat).mean(axis=0),
        "r": np.array([stats.pearsonr(y[:, j], yhat[:, j])[0] for j in cols]),
        "rho": np.array([stats.spearmanr(y[:, j], yhat[:, j])[0] for j in cols]),
    }


# --------------------------------------------------------------------------- #
# contract A: runs/baselines/<method>/coefficients_<selection>.npz
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("method", ["lr", "ridge", "lasso", "knn"])
def test_coefficients_reproduce_per_gene_metrics(toy, baseline_runs, method):
    run = json.loads((baseline_runs / method / "run.json").read_text())
    per_gene = read_per_gene(baseline_runs / method / "per_gene.csv")
    assert set(run["tasks"]) == {"geo-va", "1000g-va"}
    for sel, task in run["tasks"].items():
        W, b, value = load_coefficients(baseline_runs / method / f"coefficients_{sel}.npz")
        with np.load(baseline_runs / method / f"coefficients_{sel}.npz") as z:
            assert z["weight"].dtype == np.float32 and z["bias"].dtype == np.float32
        assert W.shape == (20, 30) and b.shape == (30,)
        if method == "lr":
            assert np.isnan(value)
        else:
            assert value == task["chosen"] and task["chosen_index"] > 0
        for split, (X, Y) in toy["splits"].items():
            if split == "geo-tr":
                continue
            rows = per_gene[(per_gene["selected_by"] == sel) & (per_gene["split"] == split)]
            assert len(rows) == 30
            yhat = X.astype(np.float64) @ W.astype(np.float64) + b
            oracle = _oracle_metrics(Y.astype(np.float64), yhat)
            for col in ("mae", "r", "rho"):
                np.testing.assert_allclose(rows[col].to_numpy(), oracle[col], rtol=2e-5, atol=1e-6, err_msg=col)


def test_coefficients_are_the_fitted_models(toy, baseline_runs):
    """LR and LR-L2 coefficients equal scikit-learn's fits at the chosen value (independent of the metrics)."""
    X, Y = (a.astype(np.float64) for a in toy["splits"]["geo-tr"])
    W, b, _ = load_coefficients(baseline_runs / "lr" / "coefficients_geo-va.npz")
    ref = LinearRegression().fit(X, Y)
    np.testing.assert_allclose(W, ref.coef_.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b, ref.intercept_, rtol=1e-4, atol=1e-5)
    run = json.loads((baseline_runs / "ridge" / "run.json").read_text())
    for sel in run["tasks"]:
        W, b, value = load_coefficients(baseline_runs / "ridge" / f"coefficients_{sel}.npz")
        ref = Ridge(alpha=len(X) * value).fit(X, Y)
        np.testing.assert_allclose(W, ref.coef_.T, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b, ref.intercept_, rtol=1e-4, atol=1e-5)


def test_coefficients_only_for_the_selections_the_dataset_has(tmp_path):
    ds = write_toy_dataset(tmp_path / "ds.h5", n_tr=60, n_landmarks=8, n_targets=6, with_rnaseq=False)
    run_baseline("ridge", ds["path"], tmp_path / "ridge", n_jobs=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "ridge").glob("coefficients_*")) == ["coefficients_geo-va.npz"]
