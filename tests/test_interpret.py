"""`dgex interpret s2|s3`: adjusted R² against sklearn, major-weight counts, outputs and bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LinearRegression

from conftest import assert_one_line_error, run_dgex
from dgex.checkpoints import load_weights
from dgex.errors import InputError
from dgex.interpret import GramFit, adjusted_r2, interpret_s2, interpret_s3, major_weights, s3_degrees
from dgex.train import train
from helpers_dataset import write_dataset_arrays, write_toy_dataset

TINY = dict(epochs=2, batch_size=100, monitor_size=100, progress=False, device="cpu", checkpoint_interval=1e9)


def _sk_adjusted(X, Y):
    """Reference: sklearn OLS with intercept, then 1 - (1 - R²)(n - 1)/(n - p - 1) per column."""
    n, p = X.shape
    pred = LinearRegression().fit(X, Y).predict(X)
    r2 = 1 - ((Y - pred) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)
    return 1 - (1 - r2) * (n - 1) / (n - p - 1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("interp")
    ds = write_toy_dataset(
        root / "toy.h5", n_tr=240, n_landmarks=10, n_targets=12, nonlinear=0.8, n_overlap=2, n_parts=2, n_va=60, n_te=60
    )
    runs = {}
    for layers, units in ((1, 8), (2, 6)):
        for part in (0, 1):
            out = root / f"{layers}x{units}" / f"part{part}"
            train(dataset=ds["path"], output_dir=out, layers=layers, units=units, dropout=0.1, part=part, **TINY)
            runs[(layers, part)] = out
    return {"root": root, "path": ds["path"], "splits": ds["splits"], "runs": runs}


# --------------------------------------------------------------------------- adjusted R²
def test_adjusted_r2_matches_sklearn_streamed():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(70, 5))
    Y = X @ rng.normal(size=(5, 4)) + rng.normal(scale=[0.1, 0.5, 1.0, 3.0], size=(70, 4)) + 5.0
    got = adjusted_r2(X, Y, chunk_size=9)  # several chunks: exercises the streamed sums
    np.testing.assert_allclose(got, _sk_adjusted(X, Y), rtol=1e-9, atol=1e-10)
    assert got[0] > got[3]  # less noise -> better fit


def test_rank_deficient_predictors_match_lstsq():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(50, 4))
    X = np.hstack([X, X[:, :1] * 2.0, np.ones((50, 1))])  # a duplicated and a constant column
    Y = rng.normal(size=(50, 3)) + X[:, :2] @ rng.normal(size=(2, 3))
    fit = GramFit(X.shape[1], Y.shape[1])
    fit.update(X, Y)
    res = fit.solve()
    assert res["rank"] == 4
    A = np.hstack([X, np.ones((50, 1))])
    beta = np.linalg.lstsq(A, Y, rcond=None)[0]
    r2 = 1 - ((Y - A @ beta) ** 2).sum(0) / ((Y - Y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(res["r2"], r2, rtol=1e-9)
    n, p = X.shape  # p counts every predictor column, also the redundant ones
    np.testing.assert_allclose(res["adjusted"], 1 - (1 - r2) * (n - 1) / (n - p - 1), rtol=1e-9)


def test_too_few_samples_gives_nan_and_note():
    rng = np.random.default_rng(3)
    fit = GramFit(6, 2)
    fit.update(rng.normal(size=(7, 6)), rng.normal(size=(7, 2)))
    res = fit.solve()
    assert np.isnan(res["adjusted"]).all() and "n=7" in res["note"]


# --------------------------------------------------------------------------- S2
def test_s2_outputs_and_values(toy, tmp_path):
    runs = [toy["runs"][(2, 1)], toy["runs"][(2, 0)]]  # order given does not matter
    info = interpret_s2(dataset=toy["path"], runs=runs, output_dir=tmp_path, device="cpu", progress=False)
    for name in ("s2_adjusted_r2.csv", "s2_summary.csv", "figure_s2.png", "figure_s2.pdf", "s2.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "s2_adjusted_r2.csv")
    assert list(table.columns) == [
        "id",
        "ensembl",
        "entrez",
        "symbol",
        "probe",
        "part",
        "overlap",
        "input",
        "hidden1",
        "hidden2",
    ]
    assert len(table) == 12 and sorted(table["part"].unique()) == [0, 1]
    X, Y = toy["splits"]["geo-tr"]
    # a target that is a copy of a landmark is fitted exactly from the inputs
    np.testing.assert_allclose(table.loc[table["overlap"], "input"], 1.0, atol=1e-6)
    np.testing.assert_allclose(
        table["input"], _sk_adjusted(X.astype(np.float64), Y.astype(np.float64)), rtol=1e-6, atol=1e-6
    )
    # hidden columns: sklearn on the eval-mode activations of each part's own network
    for part in (0, 1):
        model, _ = load_weights(toy["runs"][(2, part)] / "best_geo-va.pt")
        with torch.no_grad():
            _, acts = model(torch.as_tensor(X), return_hidden=True)
        cols = table["part"] == part
        for i, a in enumerate(acts):
            want = _sk_adjusted(a.double().numpy(), Y[:, cols.to_numpy()].astype(np.float64))
            np.testing.assert_allclose(table.loc[cols, f"hidden{i + 1}"], want, rtol=1e-5, atol=1e-6)
    summary = pd.read_csv(tmp_path / "s2_summary.csv")
    assert list(summary["representation"]) == ["input", "hidden1", "hidden2"]
    np.testing.assert_allclose(summary["mean"], table[["input", "hidden1", "hidden2"]].mean(), rtol=1e-5)
    np.testing.assert_allclose(summary["frac_above_input"].iloc[2], (table["hidden2"] > table["input"]).mean())
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert saved["split"] == "geo-tr" and saved["n_samples"] == 240 and saved["all_parts_covered"]
    assert "figure_s2" in saved["captions"] and info["network"]["layers"] == 2


def test_s2_cli_subsample_and_nan_fallback(toy, tmp_path):
    runs = [toy["runs"][(1, 0)], toy["runs"][(1, 1)]]
    s2 = ["interpret", "s2", "--dataset", toy["path"], "--runs", *runs, "--output-dir", tmp_path]
    res = run_dgex(*s2, "--split", "geo-va", "--max-samples", 11, "--device", "cpu", "--no-progress")
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(tmp_path / "s2_adjusted_r2.csv")
    assert list(table.columns) == ["id", "ensembl", "entrez", "symbol", "probe", "part", "overlap", "input", "hidden1"]
    # 11 profiles: 10 landmarks cannot be fitted (NaN + note), 8 hidden units can
    assert table["input"].isna().all() and table["hidden1"].notna().all()
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert saved["n_samples"] == 11 and any("input" in n and "n=11" in n for n in saved["notes"])
    # the input-vs-hidden comparison could not be made: the outputs say so instead of showing nan%
    assert saved["status"] == "partial" and "10 raw landmark inputs" in saved["reason"]
    assert "not computed: " in saved["captions"]["figure_s2"] and "nan" not in saved["captions"]["figure_s2"]
    summary = pd.read_csv(tmp_path / "s2_summary.csv")
    assert list(summary["status"]) == ["not computed", "computed"]


def test_s2_too_few_profiles_is_reported_not_failed(toy, tmp_path):
    """n <= p + 1 for every representation: exit 0, and every S2 output says 'not computed' and why."""
    runs = [toy["runs"][(2, 0)], toy["runs"][(2, 1)]]
    args = ["interpret", "s2", "--dataset", toy["path"], "--runs", *runs, "--device", "cpu", "--no-progress"]
    res = run_dgex(*args, "--max-samples", 5, "--output-dir", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "not computed" in res.stderr  # one warning line says it
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert saved["status"] == "not computed" and saved["n_samples"] == 5
    # 5 profiles: neither 10 landmarks nor 6 hidden units can be fitted (needs n > p + 1)
    assert "10 raw landmark inputs" in saved["reason"] and "hidden layer 2 (6 units)" in saved["reason"]
    assert saved["captions"]["figure_s2"].endswith("not computed: " + saved["reason"])
    summary = pd.read_csv(tmp_path / "s2_summary.csv")
    assert list(summary["representation"]) == ["input", "hidden1", "hidden2"]
    assert (summary["status"] == "not computed").all() and (summary["reason"] == saved["reason"]).all()
    assert summary["mean"].isna().all() and (summary["n_genes"] == 0).all()
    assert pd.read_csv(tmp_path / "s2_adjusted_r2.csv")[["input", "hidden1", "hidden2"]].isna().all().all()
    assert (tmp_path / "figure_s2.png").read_bytes()[:4] == b"\x89PNG"
    assert set(saved["files"]) == {p.name for p in tmp_path.iterdir()}
    # with enough profiles the same call computes it (the status is not stuck)
    res = run_dgex(*args, "--max-samples", 40, "--output-dir", tmp_path / "ok")
    assert res.returncode == 0, res.stderr
    ok = json.loads((tmp_path / "ok" / "s2.json").read_text())
    assert ok["status"] == "computed" and ok["reason"] is None
    assert "status" not in pd.read_csv(tmp_path / "ok" / "s2_summary.csv").columns


# --------------------------------------------------------------------------- S3
def test_major_weight_counts_on_hand_built_matrix():
    rng = np.random.default_rng(4)
    H, L, T = 60, 4, 5
    w_in = rng.normal(scale=0.01, size=(H, L))
    w_in[[3, 7], 0] = [1.0, -1.0]
    w_in[3, 2] = 2.0
    w_out = rng.normal(scale=0.01, size=(T, H))
    w_out[1, [3, 5, 9]] = [1.0, 1.5, -1.2]
    w_out[4, 3] = 0.8
    d = s3_degrees(w_in, w_out, 4.0, "unit")
    # direct count: per landmark (column of w_in) and per target (row of w_out) mean/std
    want_in = np.zeros_like(w_in, bool)
    for j in range(L):
        c = w_in[:, j]
        want_in[:, j] = np.abs(c - c.mean()) > 4 * c.std()
    want_out = np.zeros_like(w_out, bool)
    for t in range(T):
        r = w_out[t]
        want_out[t] = np.abs(r - r.mean()) > 4 * r.std()
    np.testing.assert_array_equal(d["mask_in"], want_in)
    np.testing.assert_array_equal(d["mask_out"], want_out)
    # the planted spikes are found, nothing else at 4 sigma
    assert set(zip(*np.nonzero(want_in))) == {(3, 0), (7, 0), (3, 2)}
    total, pos, neg = d["hidden_in"]
    assert total[3] == 2 and pos[3] == 2 and total[7] == 1 and neg[7] == 1 and total.sum() == 3
    total, pos, neg = d["target_in"]
    assert total[1] == want_out[1].sum() and total[4] == 1 and total.sum() == want_out.sum()
    np.testing.assert_array_equal(d["hidden_out"][0], want_out.sum(0))
    np.testing.assert_array_equal(d["landmark_out"][0], want_in.sum(0))
    # whole-matrix scope uses one mean/std
    m = major_weights(w_in, 3.0, axis=None)
    np.testing.assert_array_equal(m, np.abs(w_in - w_in.mean()) > 3 * w_in.std())


def test_s3_outputs_and_monotone_in_sigma(toy, tmp_path):
    runs = [toy["runs"][(1, 0)], toy["runs"][(1, 1)]]
    info = interpret_s3(
        runs=runs,
        output_dir=tmp_path,
        sigmas=[2.0, 1.0, 1.5],
        map_sigmas=(1.0, 1.5),
        dataset=toy["path"],
        progress=False,
    )
    for name in (
        "s3_hidden_in_degree.csv",
        "s3_target_in_degree.csv",
        "s3_landmark_out_degree.csv",
        "s3_hidden_out_degree.csv",
        "figure_s3.png",
        "figure_s3.pdf",
        "s3.json",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    hid = pd.read_csv(tmp_path / "s3_hidden_in_degree.csv")
    tg = pd.read_csv(tmp_path / "s3_target_in_degree.csv")
    assert len(hid) == 2 * 3 * 8 and len(tg) == 12 * 3 and tg["symbol"].notna().all()
    assert (hid["n_landmarks"] == hid["n_positive"] + hid["n_negative"]).all()
    for df, col, key in ((hid, "n_landmarks", ["part", "unit"]), (tg, "n_hidden", ["part", "ensembl"])):
        wide = df.pivot_table(index=key, columns="sigma", values=col)
        assert (wide[1.5] <= wide[1.0]).all() and (wide[2.0] <= wide[1.5]).all()
        assert wide[1.0].sum() > wide[2.0].sum() or wide[1.0].sum() == 0
    # the counts reproduce a direct threshold of the checkpoint's weights
    model, _ = load_weights(runs[0] / "best_geo-va.pt")
    w = model.hidden[0].weight.detach().double().numpy()
    direct = (np.abs(w - w.mean(0)) > 1.5 * w.std(0)).sum(1)
    np.testing.assert_array_equal(hid[(hid.part.astype(str) == "0") & (hid.sigma == 1.5)]["n_landmarks"], direct)
    c = next(c for c in info["counts"] if c["part"] == 0 and c["sigma_in"] == 1.5 and not c.get("map"))
    assert c["hidden_without_major_input"] == int((direct == 0).sum())
    saved = json.loads((tmp_path / "s3.json").read_text())
    assert saved["sigmas"] == [1.0, 1.5, 2.0] and "figure_s3" in saved["captions"]


# --------------------------------------------------------------------------- bad input
def test_s3_refuses_deep_network_one_line(toy, tmp_path):
    res = run_dgex("interpret", "s3", "--runs", toy["runs"][(2, 0)], "--output-dir", tmp_path / "o")
    assert_one_line_error(res, "one hidden layer", "2 hidden layers")
    assert not (tmp_path / "o").exists()


def test_bad_inputs_one_line(toy, tmp_path):
    run = toy["runs"][(1, 0)]
    res = run_dgex("interpret", "s2", "--dataset", toy["path"], "--runs", tmp_path / "nope", "--output-dir", tmp_path)
    assert_one_line_error(res, "no run.json")
    s2 = ["interpret", "s2", "--dataset", toy["path"], "--runs", run, "--output-dir", tmp_path / "o"]
    res = run_dgex(*s2, "--split", "gtex-xx", "--device", "cpu")
    assert_one_line_error(res, "--split 'gtex-xx'", "geo-tr")
    assert not (tmp_path / "o").exists()


def test_bad_inputs_raise(toy, tmp_path):
    r = toy["runs"]
    with pytest.raises(InputError, match="different networks"):
        interpret_s3(runs=[r[(1, 0)], r[(2, 1)]], output_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match="more than once"):
        interpret_s3(runs=[r[(1, 0)], r[(1, 0)]], output_dir=tmp_path, progress=False)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(r[(1, 0)] / "run.json", partial / "run.json")
    shutil.copy(r[(1, 0)] / "best_geo-va.pt", partial / "best_geo-va.pt")
    with pytest.raises(InputError, match="use --selection geo-va"):
        interpret_s3(runs=[partial], output_dir=tmp_path, selection="1000g-va", progress=False)
    # a dataset with other landmark genes than the checkpoint
    X, Y = toy["splits"]["geo-tr"]
    other = write_dataset_arrays(
        tmp_path / "other.h5",
        {"geo-tr": (X, Y), "geo-va": (X, Y)},
        parts=np.sort(np.arange(12) % 2),
        landmark_ids=[f"ENSG7{i:010d}" for i in range(X.shape[1])],
    )
    with pytest.raises(InputError, match="landmarks of the checkpoint do not match"):
        interpret_s2(dataset=other, runs=[r[(1, 0)]], output_dir=tmp_path / "o", device="cpu", progress=False)
    assert not (tmp_path / "o").exists()


def test_s3_caption_says_when_the_map_is_empty(toy, tmp_path):
    """No weight beyond k standard deviations (small networks, large k): the caption says the map marks none."""
    runs = [toy["runs"][(1, 0)], toy["runs"][(1, 1)]]
    info = interpret_s3(runs=runs, output_dir=tmp_path / "a", map_sigmas=(50, 50), progress=False)
    assert (
        "Part 0 has no major input connections at k = 50 and no major output connections at k = 50"
        in (info["captions"]["figure_s3"])
    )
    # an oracle for the other end: at k = 0.5 some of the 8 weights of a unit lie beyond it, so the map is drawn
    model, _ = load_weights(runs[0] / "best_geo-va.pt")
    w_in = model.hidden[0].weight.detach().double().numpy()
    assert major_weights(w_in, 0.5, axis=0).any()
    info = interpret_s3(runs=runs, output_dir=tmp_path / "b", map_sigmas=(0.5, 0.5), progress=False)
    assert "map marks none" not in info["captions"]["figure_s3"]
