"""Baselines: equality with scikit-learn, hyper-parameter selection, KNN-GE neighbours, outputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import Lasso, LinearRegression, Ridge

from conftest import assert_one_line_error, run_dgex
from dgex import baselines
from dgex.baselines import KNN_KS, RIDGE_LAMBDAS, fit, lasso_lambdas, run_baseline
from dgex.errors import ConfigError, InputError
from dgex.metrics import PER_GENE_COLUMNS, per_gene_mae, read_per_gene
from helpers_dataset import write_dataset_arrays, write_toy_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "ds.h5", n_tr=300, n_landmarks=20, n_targets=30)


@pytest.fixture(scope="module")
def toy_geo_only(tmp_path_factory):
    return write_toy_dataset(
        tmp_path_factory.mktemp("toy") / "ds.h5", n_tr=200, n_landmarks=15, n_targets=12, with_rnaseq=False, seed=1
    )


def _f64(*arrays):
    return [a.astype(np.float64) for a in arrays]


# --------------------------------------------------------------------------- #
# equality with scikit-learn
# --------------------------------------------------------------------------- #
def test_lr_equals_sklearn_multioutput(toy):
    X, Y = toy["splits"]["geo-tr"]
    Xt, _ = toy["splits"]["gtex-te"]
    ref = LinearRegression().fit(*_f64(X, Y)).predict(Xt.astype(np.float64))
    family = fit("lr", X, Y)
    np.testing.assert_allclose(family.predict(Xt), ref, atol=1e-4)
    assert family.info["rank"] == X.shape[1]


def test_lr_rank_deficient_gives_min_norm_solution():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(15, 25)).astype(np.float32)  # fewer profiles than landmarks
    Y = rng.normal(size=(15, 4)).astype(np.float32)
    family = fit("lr", X, Y)
    ref = LinearRegression().fit(*_f64(X, Y))
    np.testing.assert_allclose(family.weights(0)[0], ref.coef_.T, atol=1e-4)
    assert family.info["rank"] == 14  # centring removes one dimension


@pytest.mark.parametrize("lam", [1e-3, 0.1, 3.0])
def test_ridge_equals_sklearn_ridge(toy, lam):
    X, Y = toy["splits"]["geo-tr"]
    Xt, _ = toy["splits"]["geo-te"]
    family = fit("ridge", X, Y, [0.01, lam, 10.0])
    i = family.grid.index(lam)
    ref = Ridge(alpha=X.shape[0] * lam).fit(*_f64(X, Y))  # per-sample lambda -> sklearn alpha = n * lambda
    W, b = family.weights(i)
    np.testing.assert_allclose(W, ref.coef_.T, atol=1e-6)
    np.testing.assert_allclose(b, ref.intercept_, atol=1e-6)
    np.testing.assert_allclose(family.predict(Xt, i), ref.predict(Xt.astype(np.float64)), atol=1e-5)


def test_ridge_curve_matches_direct_predictions(toy):
    X, Y = toy["splits"]["geo-tr"]
    Xv, Yv = toy["splits"]["geo-va"]
    family = fit("ridge", X, Y, [1e-3, 0.1, 1.0])
    curve = family.curves({"geo-va": (Xv, Yv)})["geo-va"]
    direct = [per_gene_mae(Yv, family.predict(Xv, i)).mean() for i in range(3)]
    np.testing.assert_allclose(curve, direct, rtol=1e-9)


def test_lasso_run_equals_sklearn_lasso_for_one_gene(toy, tmp_path):
    out = run_baseline("lasso", toy["path"], tmp_path / "run", progress=False)
    lam = out["tasks"]["geo-va"]["chosen"]
    assert out["tasks"]["geo-va"]["sklearn_alpha"] == lam
    X, Y = toy["splits"]["geo-tr"]
    Xt, Yt = toy["splits"]["geo-te"]
    gene = 7  # not an overlap gene (those are exact copies: a degenerate lasso)
    ref = Lasso(alpha=lam, tol=1e-10, max_iter=100_000).fit(*_f64(X, Y[:, gene]))
    family = fit("lasso", X, Y, out["grid"])
    pred = family.predict(Xt, out["grid"].index(lam))[:, gene]
    # our path stops at sklearn's default duality-gap tolerance (1e-4 * |y|^2)
    np.testing.assert_allclose(pred, ref.predict(Xt.astype(np.float64)), atol=5e-3)
    coef = family.weights(out["grid"].index(lam))[0][:, gene]
    assert ((np.abs(coef) > 1e-3) == (np.abs(ref.coef_) > 1e-3)).mean() >= 0.9
    # the run's per-gene table scores that same model
    frame = read_per_gene(tmp_path / "run" / "per_gene.csv")
    row = frame[(frame.selected_by == "geo-va") & (frame.split == "geo-te")].iloc[gene]
    assert row["mae"] == pytest.approx(np.abs(Yt[:, gene] - ref.predict(Xt.astype(np.float64))).mean(), abs=2e-3)


def test_lasso_parallel_blocks_equal_serial(toy):
    X, Y = toy["splits"]["geo-tr"]
    serial = fit("lasso", X, Y, [0.01, 0.05])
    parallel = baselines.LassoRegression(baselines.TrainStats(X, Y), X, Y, [0.01, 0.05], n_jobs=2, block=7)
    np.testing.assert_array_equal(serial.coefs, parallel.coefs)  # seeded per gene, independent of blocks


# --------------------------------------------------------------------------- #
# hyper-parameter selection reacts to the data
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "method,grid", [("ridge", list(np.logspace(-3, 1, 9))), ("lasso", [0.003, 0.01, 0.03, 0.1, 0.3])]
)
def test_fewer_noisier_data_choose_a_larger_penalty(tmp_path, method, grid):
    chosen = {}
    for label, n_tr, noise in (("few", 30, 1.5), ("many", 3000, 0.2)):
        ds = write_toy_dataset(
            tmp_path / f"{label}.h5",
            n_tr=n_tr,
            n_landmarks=20,
            n_targets=15,
            noise=noise,
            n_va=300,
            with_rnaseq=False,
            n_overlap=0,
            seed=4,
        )
        out = run_baseline(method, ds["path"], tmp_path / label, lambdas=grid, progress=False)
        chosen[label] = out["tasks"]["geo-va"]["chosen"]
    assert chosen["few"] > chosen["many"], chosen


# --------------------------------------------------------------------------- #
# KNN-GE
# --------------------------------------------------------------------------- #
def _knn_case(rng, n, triples, noise=0.05):
    X = rng.normal(size=(n, 12))
    Y = np.column_stack([X[:, 3]] + [X[:, list(t)].mean(axis=1) for t in triples])
    Y[:, 1:] += noise * rng.normal(size=(n, len(triples)))
    return X.astype(np.float32), Y.astype(np.float32)


def test_knn_finds_constructed_neighbours_and_true_k(tmp_path):
    rng = np.random.default_rng(5)
    triples = [(1, 5, 7), (0, 2, 9), (4, 6, 11), (8, 10, 3), (1, 2, 11), (0, 6, 7), (5, 9, 10), (2, 4, 8)]
    X, Y = _knn_case(rng, 400, triples)
    family = fit("knn", X, Y, [1, 2, 3, 4, 5, 8])
    assert family.neighbours[0, 0] == 3 and family.distances[0, 0] == pytest.approx(0.0, abs=1e-3)  # the copy
    for j, t in enumerate(triples, start=1):
        assert set(family.neighbours[:3, j]) == set(t)
    # the averaging matrix: k = 3 predicts the mean of the 3 landmarks
    S, b = family.weights(2)
    assert S.shape == (12, 9) and np.allclose(S.sum(axis=0), 1.0) and not b.any()
    np.testing.assert_allclose(family.predict(X, 2)[:, 1], X[:, [1, 5, 7]].mean(axis=1), atol=1e-6)
    # cumulative-sum curve == direct predictions, and its minimum is the true k
    Xv, Yv = _knn_case(rng, 200, triples)
    curve = family.curves({"geo-va": (Xv, Yv)})["geo-va"]
    direct = [per_gene_mae(Yv, family.predict(Xv, i)).mean() for i in range(len(family.grid))]
    np.testing.assert_allclose(curve, direct, rtol=1e-6)
    assert family.grid[int(np.argmin(curve))] == 3
    # end to end through a dataset file
    path = write_dataset_arrays(tmp_path / "knn.h5", {"geo-tr": (X, Y), "geo-va": (Xv, Yv), "geo-te": (Xv, Yv)})
    out = run_baseline("knn", path, tmp_path / "run", ks=[1, 2, 3, 4, 5, 8], progress=False)
    assert out["tasks"]["geo-va"]["chosen"] == 3 and out["hyper_parameter"] == "k"


def test_knn_k_equal_to_landmarks(toy):
    X, Y = toy["splits"]["geo-tr"]
    family = fit("knn", X, Y, [X.shape[1]])
    np.testing.assert_allclose(family.predict(X, 0), np.repeat(X.mean(axis=1, keepdims=True), Y.shape[1], 1), atol=1e-5)


# --------------------------------------------------------------------------- #
# outputs
# --------------------------------------------------------------------------- #
def test_outputs_with_cross_platform_task(toy, tmp_path):
    out_dir = tmp_path / "ridge"
    out = run_baseline("ridge", toy["path"], out_dir, progress=False)
    frame = read_per_gene(out_dir / "per_gene.csv")
    assert list(frame.columns) == PER_GENE_COLUMNS
    assert set(frame["method"]) == {"LR-L2"}
    assert set(frame["selected_by"]) == {"geo-va", "1000g-va"}
    assert set(frame["split"]) == {"geo-va", "geo-te", "1000g-va", "gtex-te"}
    assert len(frame) == 2 * 4 * 30
    run = json.loads((out_dir / "run.json").read_text())
    assert set(run["tasks"]) == {"geo-va", "1000g-va"}
    assert run["grid"] == list(RIDGE_LAMBDAS) and run["n_train"] == 300 and run["n_genes"] == 30
    for task in run["tasks"].values():
        assert [c["value"] for c in task["curve"]] == run["grid"]
        assert task["tuning_mae"] == min(c["mae"] for c in task["curve"])
        assert task["sklearn_alpha"] == pytest.approx(300 * task["chosen"])
    assert {"fit", "tune", "evaluate", "total"} <= set(run["seconds"])
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    geo = metrics["geo-va"]["geo-te"]
    assert geo["all"]["n_genes"] == 30 and geo["without_overlap"]["n_genes"] == 27
    sel = frame[(frame.selected_by == "geo-va") & (frame.split == "geo-te")]
    assert geo["all"]["mae_mean"] == pytest.approx(sel["mae"].mean(), rel=1e-6)
    # the tuning MAE of the chosen value is the score on that split
    assert metrics["1000g-va"]["1000g-va"]["all"]["mae_mean"] == pytest.approx(
        run["tasks"]["1000g-va"]["tuning_mae"], rel=1e-6
    )
    assert out["metrics"] == metrics
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "coefficients_1000g-va.npz",
        "coefficients_geo-va.npz",
        "metrics.json",
        "per_gene.csv",
        "run.json",
    ]


def test_outputs_without_rnaseq(toy_geo_only, tmp_path):
    run_baseline("lr", toy_geo_only["path"], tmp_path / "lr", progress=False)
    frame = read_per_gene(tmp_path / "lr" / "per_gene.csv")
    assert set(frame["selected_by"]) == {"geo-va"}
    assert set(frame["split"]) == {"geo-va", "geo-te"}
    assert set(frame["method"]) == {"LR"}
    run = json.loads((tmp_path / "lr" / "run.json").read_text())
    assert list(run["tasks"]) == ["geo-va"] and run["hyper_parameter"] is None


def test_lr_scores_equal_sklearn_scores(toy_geo_only, tmp_path):
    run_baseline("lr", toy_geo_only["path"], tmp_path / "lr", progress=False)
    frame = read_per_gene(tmp_path / "lr" / "per_gene.csv")
    X, Y = toy_geo_only["splits"]["geo-tr"]
    Xt, Yt = toy_geo_only["splits"]["geo-te"]
    ref = per_gene_mae(Yt, LinearRegression().fit(*_f64(X, Y)).predict(Xt.astype(np.float64)))
    np.testing.assert_allclose(frame[frame.split == "geo-te"]["mae"], ref, rtol=1e-5, atol=1e-7)


def test_default_grids():
    assert lasso_lambdas(1600, 943)[-1] == pytest.approx(np.sqrt(2 * np.log(943) / 1600) / np.sqrt(2))
    assert len(lasso_lambdas(1600, 943)) == 5 and lasso_lambdas(88807, 943)[0] < lasso_lambdas(1600, 943)[0]
    assert baselines.check_grid("knn", None, 100, 12) == [k for k in KNN_KS if k <= 12]


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        (dict(method="svm"), ConfigError, "unknown baseline method"),
        (dict(method="ridge", lambdas=[]), ConfigError, "empty"),
        (dict(method="ridge", lambdas=[0.1, 0.0]), ConfigError, "> 0"),
        (dict(method="lasso", lambdas=[-1.0]), ConfigError, "> 0"),
        (dict(method="lasso", lambdas=[float("nan")]), ConfigError, "finite"),
        (dict(method="knn", ks=[]), ConfigError, "empty"),
        (dict(method="knn", ks=[3, 21]), ConfigError, "exceeds the 20 landmark"),
        (dict(method="knn", ks=[0]), ConfigError, ">= 1"),
        (dict(method="knn", lambdas=[1.0]), ConfigError, "--ks"),
        (dict(method="ridge", ks=[3]), ConfigError, "--lambdas"),
        (dict(method="lr", lambdas=[1.0]), ConfigError, "no hyper-parameter"),
        (dict(method="lasso", n_jobs=0), ConfigError, "--n-jobs"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_write_nothing(toy, tmp_path, kwargs, exc, fragment):
    method = kwargs.pop("method")
    with pytest.raises(exc) as err:
        run_baseline(method, toy["path"], tmp_path / "out", progress=False, **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_bad_dataset_errors(tmp_path, toy):
    with pytest.raises(InputError, match="not found"):
        run_baseline("lr", tmp_path / "missing.h5", tmp_path / "out")
    X, Y = toy["splits"]["geo-tr"]
    path = write_dataset_arrays(tmp_path / "no_va.h5", {"geo-tr": (X, Y)})
    with pytest.raises(InputError, match="geo-va is missing"):
        run_baseline("lr", path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failure_during_evaluation_writes_nothing(toy, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(baselines, "per_gene_frame", boom)
    with pytest.raises(RuntimeError):
        run_baseline("ridge", toy["path"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_cli(toy_geo_only, tmp_path):
    res = run_dgex(
        "baseline",
        "knn",
        "--dataset",
        toy_geo_only["path"],
        "--output-dir",
        tmp_path / "knn",
        "--ks",
        "1",
        "3",
        "5",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "knn" / "run.json").read_text())["grid"] == [1, 3, 5]
    res = run_dgex(
        "baseline", "ridge", "--dataset", toy_geo_only["path"], "--output-dir", tmp_path / "bad", "--lambdas", "-1"
    )
    assert_one_line_error(res, "--lambdas must be finite and > 0")
    assert not (tmp_path / "bad").exists()
