"""Linear models as bundles (issue 13): the baselines' kept coefficients and `dgex export` of LR / LR-L2."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.linear_model import LinearRegression, Ridge

from conftest import assert_one_line_error, run_dgex
from dgex.baselines import load_coefficients, run_baseline
from dgex.bundle import FORMAT_OF_KIND, TABLE_FILES, export_bundle, load_bundle, write_bundle
from dgex.dataset import ProcessedDataset
from dgex.errors import InputError
from dgex.infer import infer, predict
from dgex.io import GCTXReader, write_gctx
from dgex.metrics import read_per_gene
from dgex.models import DGEX
from helpers_dataset import write_toy_dataset
from test_bundle_integrity import FIX, _refused  # the same one-line refusal as for D-GEX bundles


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


# --------------------------------------------------------------------------- #
# linear bundles: `dgex export --baseline-run`, then `dgex infer` as for D-GEX
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def linear(toy, baseline_runs, tmp_path_factory):
    """The toy dataset with per-gene GEO statistics, LR-L2 and LR bundles, GEO-te on the expression scale."""
    root = tmp_path_factory.mktemp("linear")
    ds = root / "ds.h5"
    shutil.copy(toy["path"], ds)
    # per-gene statistics (the helper writes 8 +- 1 everywhere), so a gene-order or scale mix-up would show;
    # the baselines' fingerprint check then needs runs on this very dataset
    rng = np.random.default_rng(7)
    with h5py.File(ds, "a") as h5:
        h5["stats/geo/mean"][...] = rng.uniform(4, 12, size=50)
        h5["stats/geo/std"][...] = rng.uniform(0.5, 2.0, size=50)
    runs = {m: root / "runs" / m for m in ("ridge", "lr")}
    for m, d in runs.items():
        run_baseline(m, ds, d, n_jobs=1, progress=False)
    bundles = {m: root / f"model_{m}" for m in runs}
    for m, b in bundles.items():
        export_bundle(dataset=ds, baseline_run=runs[m], output=b, progress=False)
    with ProcessedDataset(ds) as d:
        X, (mean, std), eps, ids, genes = d.X("geo-te"), d.stats("geo"), d.attrs["epsilon"], d.ids("geo-te"), d.genes()
    x_expr = (X.astype(np.float64) * (std[:20] + eps) + mean[:20]).astype(np.float32)
    gctx = root / "geo_te.gctx"
    write_gctx(gctx, x_expr, genes.landmarks["ensembl"], ids)
    return {"root": root, "dataset": ds, "runs": runs, "bundles": bundles, "x": x_expr, "gctx": gctx,
            "mean": mean, "std": std, "eps": eps, "genes": genes, "y_std": toy["splits"]["geo-te"][1]}  # fmt: skip


def _oracle(linear, method: str, x: np.ndarray, selection: str = "geo-va") -> np.ndarray:
    """Raw landmark expression ``(n, L)`` -> target expression ``(n, T)`` with the coefficients file, in numpy."""
    W, b, _ = load_coefficients(linear["runs"][method] / f"coefficients_{selection}.npz")
    mean, std, eps, L = linear["mean"], linear["std"], linear["eps"], W.shape[0]
    z = (x.astype(np.float64) - mean[:L]) / (std[:L] + eps)
    return (z @ W.astype(np.float64) + b) * (std[L:] + eps) + mean[L:]


def _read_gctx(path):
    r = GCTXReader(path)
    try:
        return r.read(), r.row_meta(), list(r.row_ids)
    finally:
        r.close()


@pytest.mark.parametrize("method", ["ridge", "lr"])
def test_linear_bundle_predicts_what_the_coefficients_give(linear, method, tmp_path):
    out = tmp_path / "pred.gctx"
    infer(model=linear["bundles"][method], input=linear["gctx"], output=out, device="cpu", progress=False)
    y, _, rows = _read_gctx(out)
    expected = _oracle(linear, method, linear["x"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=2e-4)
    assert rows == list(linear["genes"].targets["ensembl"])
    # and back in the standardised space the predictions score as the baseline's own per_gene.csv says
    T0 = linear["mean"][20:]
    y_std = (y.astype(np.float64) - T0) / (linear["std"][20:] + linear["eps"])
    per_gene = read_per_gene(linear["runs"][method] / "per_gene.csv")
    sel = per_gene[(per_gene.selected_by == "geo-va") & (per_gene.split == "geo-te")]
    mae = np.abs(y_std - linear["y_std"]).mean(axis=0)
    np.testing.assert_allclose(mae, sel["mae"].to_numpy(), rtol=1e-4, atol=1e-5)


def test_linear_bundle_through_the_cli_and_python_api(linear, tmp_path):
    out = tmp_path / "pred.csv"
    res = run_dgex("infer", "--model", linear["bundles"]["ridge"], "--input", linear["gctx"], "--output", out,
                   "--no-progress", "--device", "cpu")  # fmt: skip
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(out)
    samples = [c for c in table.columns if c.startswith("geo-te-")]
    np.testing.assert_allclose(table[samples].to_numpy().T, _oracle(linear, "ridge", linear["x"]), rtol=1e-5, atol=1e-3)
    # the log says which model predicts: kind, method, hyper-parameter, selection
    assert "kind linear: LR-L2 linear model lambda = " in res.stderr and "selected by geo-va" in res.stderr
    np.testing.assert_allclose(
        predict(linear["bundles"]["ridge"], linear["x"], device="cpu"), _oracle(linear, "ridge", linear["x"]),
        rtol=1e-5, atol=2e-4,
    )  # fmt: skip


def test_linear_bundle_contents(linear):
    b = linear["bundles"]["ridge"]
    info = json.loads((b / "bundle.json").read_text())
    run = json.loads((linear["runs"]["ridge"] / "run.json").read_text())
    assert info["format_version"] == FORMAT_OF_KIND["linear"] == 2 and info["kind"] == "linear"
    assert sorted(info["files"]) == sorted([*TABLE_FILES, "linear.npz"])
    assert sorted(p.name for p in b.iterdir()) == sorted([*TABLE_FILES, "linear.npz", "bundle.json"])
    assert info["architecture"] == {"n_landmarks": 20, "n_targets": 30, "method": "LR-L2"}
    assert info["model"]["value"] == run["tasks"]["geo-va"]["chosen"] and info["selection"] == "geo-va"
    with np.load(b / "linear.npz") as z:
        W, bias, _ = load_coefficients(linear["runs"]["ridge"] / "coefficients_geo-va.npz")
        np.testing.assert_array_equal(z["weight"], W)
        np.testing.assert_array_equal(z["bias"], bias)
    assert load_bundle(b).describe().startswith("kind linear: LR-L2 linear model lambda = ")


def test_linear_bundle_of_the_cross_platform_choice(linear, tmp_path):
    out = tmp_path / "b"
    export_bundle(dataset=linear["dataset"], baseline_run=linear["runs"]["ridge"], output=out,
                  selection="1000g-va", progress=False)  # fmt: skip
    W, b, _ = load_coefficients(linear["runs"]["ridge"] / "coefficients_1000g-va.npz")
    with np.load(out / "linear.npz") as z:
        np.testing.assert_array_equal(z["weight"], W)
    assert json.loads((out / "bundle.json").read_text())["selection"] == "1000g-va"


def test_export_errors_are_one_line(linear, tmp_path):
    ds, run = linear["dataset"], linear["runs"]["ridge"]
    res = run_dgex("export", "--dataset", ds, "--baseline-run", tmp_path, "--output", tmp_path / "b")
    assert_one_line_error(res, "run.json not found", "--baseline-run")
    res = run_dgex("export", "--dataset", ds, "--baseline-run", run, "--runs", run, "--output", tmp_path / "b")
    assert res.returncode == 2 and "not allowed with" in res.stderr  # argparse: one source only
    # a baseline run on another dataset (other statistics) is refused by its fingerprint
    other = write_toy_dataset(tmp_path / "other.h5", n_tr=40, n_landmarks=20, n_targets=30, seed=5)["path"]
    res = run_dgex("export", "--dataset", other, "--baseline-run", run, "--output", tmp_path / "b")
    assert_one_line_error(res, "was trained on another dataset")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- #
# integrity of linear bundles (as tests/test_bundle_integrity.py for D-GEX)
# --------------------------------------------------------------------------- #
REQUIRED_LINEAR_TOP = {"format", "format_version", "kind", "dgex_version", "created", "architecture", "files"}
REQUIRED_LINEAR_ARCH = {"n_landmarks", "n_targets", "method"}


@pytest.fixture
def lbundle(linear, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(linear["bundles"]["ridge"], dst)
    return dst


def _info(b):
    return json.loads((b / "bundle.json").read_text())


def _save(b, info, rehash=False):
    if rehash:
        info["files"] = {n: hashlib.sha256((b / n).read_bytes()).hexdigest() for n in info["files"]}
    (b / "bundle.json").write_text(json.dumps(info))


def _write_npz(b, **arrays):
    with open(b / "linear.npz", "wb") as fh:
        np.savez(fh, **arrays)


def test_tampered_linear_weights(lbundle, linear, tmp_path):
    with np.load(lbundle / "linear.npz") as z:
        w, bias = z["weight"].copy(), z["bias"]
    w[0, 0] += 1.0
    _write_npz(lbundle, weight=w, bias=bias)
    _refused(lbundle, "linear.npz does not match its checksum")
    res = run_dgex("infer", "--model", lbundle, "--input", linear["gctx"], "--output", tmp_path / "p.gctx")
    assert_one_line_error(res, "linear.npz does not match its checksum", FIX)
    assert not (tmp_path / "p.gctx").exists()


def test_linear_weights_of_the_wrong_shape_or_content(lbundle):
    with np.load(lbundle / "linear.npz") as z:
        w, bias = z["weight"], z["bias"]
    _write_npz(lbundle, weight=w[:, :-1], bias=bias)
    _save(lbundle, _info(lbundle), rehash=True)
    _refused(lbundle, "bundle files disagree", "weight (20, 29)")
    _write_npz(lbundle, weight=w)
    _save(lbundle, _info(lbundle), rehash=True)
    _refused(lbundle, "linear.npz lacks bias")
    _write_npz(lbundle, weight=np.where(np.arange(30) == 3, np.nan, w), bias=bias)
    _save(lbundle, _info(lbundle), rehash=True)
    _refused(lbundle, "not finite")
    (lbundle / "linear.npz").write_bytes(b"not a zip")
    _save(lbundle, _info(lbundle), rehash=True)
    _refused(lbundle, "linear.npz unreadable")


def test_linear_bundle_files(lbundle):
    info = _info(lbundle)
    info["files"].pop("linear.npz")
    _save(lbundle, info)
    _refused(lbundle, "no checksum for linear.npz")
    info["files"]["weights_all.pt"] = "0" * 64  # a D-GEX weights file is not a file of a linear bundle
    _save(lbundle, info)
    _refused(lbundle, "lists weights_all.pt, not a file of format 2")


def _sweep(b, where, required):
    original = (b / "bundle.json").read_text()
    keys = list(where(json.loads(original)))
    assert required <= set(keys)
    for key in keys:
        info = json.loads(original)
        del where(info)[key]
        (b / "bundle.json").write_text(json.dumps(info))
        if key in required:
            msg = str(pytest.raises(InputError, load_bundle, b).value)
            assert key.replace("_", " ") in msg or key in msg, (key, msg)
            assert "\n" not in msg and msg.startswith(f"{b}: "), msg
        else:
            load_bundle(b)
    (b / "bundle.json").write_text(original)


def test_every_required_key_of_a_linear_bundle(lbundle):
    _sweep(lbundle, lambda i: i, REQUIRED_LINEAR_TOP)
    _sweep(lbundle, lambda i: i["architecture"], REQUIRED_LINEAR_ARCH)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda i: i.update(kind="ridge"), 'kind is "ridge"'),
        (lambda i: i.update(format_version=1), "in a format 1 bundle"),  # format 1 knew only D-GEX
        (lambda i: i.update(format_version=3), "bundle format version 3"),
        (lambda i: i["architecture"].update(n_targets=29), "29 targets"),
        (lambda i: i["architecture"].update(method=None), "method"),
    ],
)
def test_wrong_kind_version_and_architecture(lbundle, edit, fragment):
    info = _info(lbundle)
    edit(info)
    _save(lbundle, info)
    msg = str(pytest.raises(InputError, load_bundle, lbundle).value)
    assert fragment in msg and "\n" not in msg and "re-export" in msg, msg


def test_a_dgex_bundle_claiming_to_be_linear_is_refused(tmp_path):
    b = _dgex_bundle(tmp_path / "d")
    info = _info(b)
    info.update(kind="linear", format_version=2)
    _save(b, info)
    _refused(b, "architecture lacks method")


def _dgex_bundle(path):
    """A small D-GEX bundle (random network, no reliability) as write_bundle writes it."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    L, T = 6, 4
    write_bundle(
        path,
        networks=[(None, DGEX(L, T, 1, 5))],
        landmarks=pd.DataFrame(
            {
                "ensembl": [f"ENSG{i:011d}" for i in range(L)],
                "entrez": [str(i) for i in range(L)],
                "symbol": [f"LM{i}" for i in range(L)],
            }
        ),  # fmt: skip
        targets=pd.DataFrame(
            {
                "ensembl": [f"ENSG9{i:010d}" for i in range(T)],
                "entrez": [str(90 + i) for i in range(T)],
                "symbol": [f"TG{i}" for i in range(T)],
                "part": 0,
            }
        ),  # fmt: skip
        stats={
            "landmark_mean": rng.uniform(6, 10, L),
            "landmark_std": rng.uniform(0.5, 1.5, L),
            "target_mean": rng.uniform(4, 12, T),
            "target_std": rng.uniform(0.5, 2, T),
            "epsilon": 1e-3,
            "gene_quantiles": np.sort(rng.uniform(3, 13, L + T)),
            "landmark_quantiles": np.sort(rng.uniform(5, 11, L)),
        },  # fmt: skip
        extra={"selection": "geo-va"},
    )
    return path


def test_dgex_bundles_stay_format_1_and_old_ones_still_load(tmp_path, caplog):
    b = _dgex_bundle(tmp_path / "d")
    info = _info(b)
    assert info["format_version"] == 1 and info["kind"] == "dgex"
    x = np.random.default_rng(1).normal(8, 1, (5, 6)).astype(np.float32)
    expected = predict(load_bundle(b), x)
    del info["kind"]  # as written before kinds existed
    _save(b, info)
    old = load_bundle(b)
    assert old.kind == "dgex" and old.reliability_columns == []
    np.testing.assert_array_equal(predict(old, x), expected)
    with caplog.at_level(logging.INFO, logger="dgex.bundle"):
        assert "kind dgex: D-GEX 1x5 tanh" in old.describe() and "reliability: none" in old.describe()


# --------------------------------------------------------------------------- #
# the workflow: the chosen D-GEX and the chosen LR-L2 exported, and which one validation prefers
# --------------------------------------------------------------------------- #
def _workflow_config(tmp_path, **export):
    import yaml

    from conftest import REPO

    cfg = yaml.safe_load((REPO / "config/test.yaml").read_text())
    cfg.update(results_dir=str(tmp_path / "results"), resources_dir=str(tmp_path / "resources"))
    cfg["grid"] = {"layers": [1], "units": [8], "dropout": [0.0]}
    cfg["baselines"]["methods"] = ["lr", "ridge"]
    cfg["report"] = {"figures": False}
    cfg["interpret"] = {"s2": False, "s3": False}
    cfg["export"] = {"enabled": True, "selection": "geo-va", **export}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _snakemake(*args):
    import subprocess
    import sys

    from conftest import REPO

    return subprocess.run(
        [sys.executable, "-m", "snakemake", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.slow
def test_workflow_exports_dgex_and_lr_l2_and_prefers_one(tmp_path):
    path = _workflow_config(tmp_path, baselines=["ridge", "lr"])
    res = _snakemake("--cores", "2", "--configfile", path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "results" / "test"
    ridge = json.loads((run / "model_lr-l2" / "bundle.json").read_text())
    assert ridge["kind"] == "linear" and ridge["architecture"]["method"] == "LR-L2"
    with np.load(run / "model_lr-l2" / "linear.npz") as z:
        W, _, _ = load_coefficients(run / "runs" / "baselines" / "ridge" / "coefficients_geo-va.npz")
        np.testing.assert_array_equal(z["weight"], W)
    assert json.loads((run / "model" / "bundle.json").read_text())["kind"] == "dgex"
    # the preference, recomputed from the per-gene files of the runs behind each bundle
    mae = {}
    dgex = pd.concat([read_per_gene(p) for p in (run / "runs" / "dgex" / "1x8_d0").glob("part*/per_gene.csv")])
    mae[str(run / "model")] = dgex.query("selected_by == 'geo-va' and split == 'geo-va'")["mae"].mean()
    for folder, method in (("model_lr-l2", "ridge"), ("model_lr", "lr")):
        pg = read_per_gene(run / "runs" / "baselines" / method / "per_gene.csv")
        mae[str(run / folder)] = pg.query("selected_by == 'geo-va' and split == 'geo-va'")["mae"].mean()
    pref = json.loads((run / "preferred_model.json").read_text())
    assert pref["preferred"] == min(mae, key=mae.get)
    assert [c["bundle"] for c in pref["candidates"]] == [str(run / m) for m in ("model", "model_lr-l2", "model_lr")]
    assert {c["bundle"]: c["validation_mae"] for c in pref["candidates"]} == pytest.approx(mae, rel=1e-6)


@pytest.mark.slow
def test_workflow_refuses_to_export_a_baseline_it_does_not_run(tmp_path):
    path = _workflow_config(tmp_path, baselines=["lasso"])
    res = _snakemake("-n", "--configfile", path)
    assert res.returncode != 0
    assert "export.baselines lists lasso but baselines.methods does not run it" in res.stdout + res.stderr
    res = _snakemake("-n", "--configfile", _workflow_config(tmp_path, baselines=[]))
    assert res.returncode == 0 and "export_linear" not in res.stdout and "prefer_model" not in res.stdout
