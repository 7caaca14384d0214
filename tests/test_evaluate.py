"""`dgex score-test-set`: every D-GEX and baseline scored on a prepared test set, on synthetic data.

The answers are known: scored on its own GEO-te split, a network reproduces the run's per_gene.csv;
a baseline's metrics are numpy's on ``x @ W + b``; a test set from the training distribution scores
like GEO-te, a shifted one worse; the bootstrap CI resamples samples (its width is the standard error
of the sample mean) and shrinks with n; win rates and p-values are scipy's.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from conftest import assert_one_line_error, run_dgex
from dgex.aggregate import aggregate
from dgex.baselines import run_baseline
from dgex.dataset import ProcessedDataset, encode
from dgex.errors import InputError
from dgex.evaluate import collect_test_sets, compare_rows, score_test_set
from dgex.metrics import per_gene_frame, read_per_gene
from dgex.train import train
from helpers_dataset import write_toy_dataset

SMALL = dict(epochs=6, batch_size=50, monitor_size=100, progress=False, threads=1, device="cpu")
GRID = [(1, 16, 0.1), (2, 16, 0.1)]
N_BOOT = 500


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy dataset, two trained grid points (2 parts each), LR and LR-L2 with coefficients, their aggregate."""
    n = torch.get_num_threads()
    root = tmp_path_factory.mktemp("evaluate")
    toy = write_toy_dataset(
        root / "ds.h5", n_tr=400, n_landmarks=12, n_targets=16, nonlinear=0.5, n_va=200, n_te=400, n_parts=2
    )
    dgex_dirs = []
    for layers, units, dropout in GRID:
        for part in (0, 1):
            d = root / "runs" / f"{layers}x{units}_d{dropout:g}" / f"part{part}"
            train(dataset=toy["path"], output_dir=d, layers=layers, units=units, dropout=dropout, part=part, **SMALL)
            dgex_dirs.append(d)
    torch.set_num_threads(n)
    base_dirs, coef = [], {}
    with ProcessedDataset(toy["path"]) as ds:
        fp = ds.fingerprint()["sha256"]
    for method in ("lr", "ridge"):
        d = root / "baselines" / method
        run_baseline(method, toy["path"], d, progress=False, n_jobs=1)
        base_dirs.append(d)
        for sel in ("geo-va", "1000g-va"):  # contract A: the chosen map of each selection
            with np.load(d / f"coefficients_{sel}.npz") as z:
                coef[(method, sel)] = (z["weight"], z["bias"])
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=root / "agg")
    return {"root": root, "toy": toy, "dgex": dgex_dirs, "base": base_dirs, "coef": coef, "fp": fp}


def write_test_set(path, x, y, fingerprint, name="ts", protocol="own-statistics"):
    """A prepared test set in contract B's layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["landmarks"] = np.asarray(x, np.float32)
        h5["targets"] = np.asarray(y, np.float32)
        h5["sample_ids"] = encode([f"s{i}" for i in range(len(x))])
        h5.attrs.update(
            {
                "name": name,
                "protocol": protocol,
                "source": "synthetic",
                "filter": "{}",
                "dataset_fingerprint": fingerprint,
                "n_samples": len(x),
            }
        )
    return path


def split(world, name):
    with ProcessedDataset(world["toy"]["path"]) as ds:
        return ds.X(name), ds.Y(name)


def run_score(world, ts, out, **kw):
    """score_test_set with the world's dataset, aggregate and runs (``kw`` replaces any of them)."""
    args = dict(dataset=world["toy"]["path"], aggregate=world["root"] / "agg", dgex_runs=world["dgex"])
    return score_test_set(test_set=ts, output_dir=out, **{**args, "baseline_runs": world["base"], **kw})


def score(world, tmp_path, x, y, name="ts", fingerprint=None, **kw):
    ts = write_test_set(tmp_path / "in" / name / "data.h5", x, y, fingerprint or world["fp"], name=name)
    out = tmp_path / "out"
    info = run_score(world, ts, out, n_boot=kw.pop("n_boot", N_BOOT), **kw)
    pg = pd.read_csv(out / "test_sets" / name / "per_gene.csv", dtype={"ensembl": str})
    table = pd.read_csv(out / "tables" / f"test_set_{name}.csv")
    return info, pg, table, out


# --------------------------------------------------------------------------- strong oracles
def test_dgex_on_its_own_geo_te_equals_the_runs_per_gene(world, tmp_path):
    """The test set IS the dataset's GEO-te: loading every part's network must reproduce what training wrote."""
    x, y = split(world, "geo-te")
    _, pg, _, _ = score(world, tmp_path, x, y)
    checked = 0
    for d in world["dgex"]:
        info = json.loads((d / "run.json").read_text())
        cfg = info["config"]
        own = read_per_gene(d / "per_gene.csv")
        for sel in ("geo-va", "1000g-va"):
            want = own[(own["split"] == "geo-te") & (own["selected_by"] == sel)].set_index("ensembl")
            got = pg[
                (pg["method"] == "D-GEX")
                & (pg["selected_by"] == sel)
                & (pg["layers"] == cfg["layers"])
                & (pg["dropout"] == cfg["dropout"])
            ].set_index("ensembl")
            got = got.loc[want.index]
            assert (got["split"] == "ts").all()
            for col in ("mae", "r", "rho"):
                np.testing.assert_allclose(got[col], want[col], rtol=2e-5, atol=1e-7, err_msg=f"{d} {sel} {col}")
            checked += len(want)
    assert checked == 2 * 2 * 16  # grid points x selections x targets (over both parts)


def test_baseline_metrics_are_numpys_on_x_w_plus_b(world, tmp_path):
    x, y = split(world, "geo-te")
    _, pg, _, _ = score(world, tmp_path, x, y)
    for (method, sel), (w, b) in world["coef"].items():
        name = {"lr": "LR", "ridge": "LR-L2"}[method]
        yhat = x.astype(np.float64) @ w.astype(np.float64) + b.astype(np.float64)
        err = np.abs(y.astype(np.float64) - yhat)
        got = pg[(pg["method"] == name) & (pg["selected_by"] == sel)]  # rows in the dataset's target order
        assert len(got) == 16
        cols = np.arange(16)
        # the CSV keeps 8 significant digits
        np.testing.assert_allclose(got["mae"], err.mean(axis=0)[cols], rtol=1e-7)
        r = [np.corrcoef(y[:, j], yhat[:, j])[0, 1] for j in cols]
        rho = [stats.spearmanr(y[:, j], yhat[:, j]).statistic for j in cols]
        np.testing.assert_allclose(got["r"], r, rtol=1e-6)
        np.testing.assert_allclose(got["rho"], rho, rtol=1e-6)


def test_baselines_on_their_own_geo_te_equal_the_runs_per_gene(world, tmp_path):
    """The coefficients `dgex baseline` keeps reproduce the errors it wrote for GEO-te."""
    x, y = split(world, "geo-te")
    _, pg, _, _ = score(world, tmp_path, x, y)
    for d in world["base"]:
        own = read_per_gene(d / "per_gene.csv")
        method = json.loads((d / "run.json").read_text())["method"]
        for sel in ("geo-va", "1000g-va"):
            want = own[(own["split"] == "geo-te") & (own["selected_by"] == sel)]
            got = pg[(pg["method"] == method) & (pg["selected_by"] == sel)]
            assert list(got["ensembl"]) == list(want["ensembl"]) and len(got) == 16
            for col in ("mae", "r", "rho"):
                # the run fits in float64, the kept coefficients are float32
                np.testing.assert_allclose(got[col], want[col], rtol=1e-5, atol=1e-7, err_msg=f"{d} {sel} {col}")


# --------------------------------------------------------------------------- known answers
def _best_row(table, sel="geo-va"):
    return table[(table["selected_by"] == sel) & table["best_dgex"]].iloc[0]


def test_training_distribution_scores_like_geo_te_and_a_shifted_set_worse(world, tmp_path):
    """Fresh profiles of the training distribution (GEO-va: never trained on) score like GEO-te, within the
    bootstrap's sampling noise; the same profiles with a per-gene target offset score clearly worse."""
    x, y = split(world, "geo-va")
    _, _, table, _ = score(world, tmp_path / "same", x, y)
    summary = pd.read_csv(world["root"] / "agg" / "summary.csv")
    for _, row in table.iterrows():
        m = (summary["method"] == row["method"]) & (summary["selected_by"] == row["selected_by"])
        m &= summary["split"] == "geo-te"
        if row["method"] == "D-GEX":
            m &= (summary["layers"] == row["layers"]) & (summary["dropout"] == row["dropout"])
        geo_te = float(summary.loc[m, "mae_mean"].iloc[0])
        half = (row["mae_ci_high"] - row["mae_ci_low"]) / 2
        assert abs(row["mae_mean"] - geo_te) < 2.5 * half, (row["model"], row["mae_mean"], geo_te, half)
    offset = np.random.default_rng(3).choice([-0.8, 0.8], size=y.shape[1]).astype(np.float32)
    _, _, shifted, _ = score(world, tmp_path / "shifted", x, y + offset)
    for sel in ("geo-va", "1000g-va"):
        same, worse = _best_row(table, sel), _best_row(shifted, sel)
        assert worse["mae_ci_low"] > same["mae_ci_high"], (same["mae_mean"], worse["mae_mean"])


def test_bootstrap_resamples_samples_covers_the_mean_and_shrinks_with_n(world, tmp_path):
    x, y = split(world, "geo-te")
    _, pg, big, _ = score(world, tmp_path / "big", x, y, n_boot=4000, seed=5)
    assert ((big["mae_ci_low"] <= big["mae_mean"]) & (big["mae_mean"] <= big["mae_ci_high"])).all()
    # the CI's width is that of the mean of per-sample errors (samples resampled), not of per-gene errors
    with ProcessedDataset(world["toy"]["path"]) as ds:
        lm = ds.genes().landmarks
    assert len(lm) == 12
    w, b = world["coef"][("ridge", "geo-va")]
    e = np.abs(y - (x.astype(np.float64) @ w + b)).mean(axis=1)
    want = 2 * 1.959964 * e.std(ddof=1) / np.sqrt(len(e))
    row = big[(big["method"] == "LR-L2") & (big["selected_by"] == "geo-va")].iloc[0]
    assert row["mae_ci_high"] - row["mae_ci_low"] == pytest.approx(want, rel=0.12)
    _, _, small, _ = score(world, tmp_path / "small", x[:40], y[:40], n_boot=4000, seed=5)
    width = lambda t: (t["mae_ci_high"] - t["mae_ci_low"]).to_numpy()  # noqa: E731
    # width ~ 1/sqrt(n): 40 -> 400 samples narrows it about 3.2-fold
    assert (width(big) < 0.6 * width(small)).all(), (width(big), width(small))


def _frame(mae, method):
    genes = pd.DataFrame(
        {"ensembl": [f"G{i}" for i in range(len(mae))], "symbol": "s", "entrez": "1", "part": 0, "overlap": False}
    )
    f = per_gene_frame(genes, method, "geo-va", "ts", np.zeros((2, len(mae))), np.zeros((2, len(mae))))
    f["mae"] = mae
    return f


def test_win_rate_and_wilcoxon_are_scipys():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.3, 0.6, 200)
    dgex_a = base + rng.normal(-0.01, 0.02, 200)
    dgex_b = base + rng.normal(0.02, 0.02, 200)
    models = [
        {"method": "D-GEX", "arch": (1, 9, 0.1), "frame": _frame(dgex_a, "D-GEX"), "sample_err": rng.random(30)},
        {"method": "D-GEX", "arch": (2, 9, 0.1), "frame": _frame(dgex_b, "D-GEX"), "sample_err": rng.random(30)},
        {"method": "LR-L2", "arch": None, "frame": _frame(base, "LR-L2"), "sample_err": rng.random(30)},
    ]
    rows = {r["model"]: r for r in compare_rows(models, "geo-va", (1, 9, 0.1), n_boot=50, seed=0)}
    a, b = rows["D-GEX-10% 1×9"], rows["D-GEX-10% 2×9"]
    assert a["best_dgex"] and not b["best_dgex"]
    assert a["lower_mae_vs_lr_l2"] == pytest.approx(np.mean(dgex_a < base))
    assert a["wilcoxon_p_vs_lr_l2"] == pytest.approx(stats.wilcoxon(dgex_a, base).pvalue)
    assert b["lower_mae_vs_best_dgex"] == pytest.approx(np.mean(dgex_b < dgex_a))
    assert b["wilcoxon_p_vs_best_dgex"] == pytest.approx(stats.wilcoxon(dgex_b, dgex_a).pvalue)
    lr = rows["LR-L2"]
    assert lr["lower_mae_vs_best_dgex"] == pytest.approx(np.mean(base < dgex_a))
    # nothing is compared with itself
    assert lr["lower_mae_vs_lr_l2"] is None and a["lower_mae_vs_best_dgex"] is None


# --------------------------------------------------------------------------- files, captions, errors
def test_outputs_caption_and_index(world, tmp_path):
    x, y = split(world, "geo-te")
    info, pg, table, out = score(world, tmp_path, x, y, name="heldout")
    for f in ("tables/test_set_heldout.md", "figures/test_set_heldout_scatter.png", "test_sets/heldout/score.json"):
        assert (out / f).is_file(), f
    assert pg.columns[:11].tolist() == read_per_gene(out / "test_sets" / "heldout" / "per_gene.csv").columns.tolist()
    # every grid point and baseline, both selections
    assert pg.groupby(["selected_by", "method"]).size().to_dict() == {
        (s, m): 16 * (2 if m == "D-GEX" else 1) for s in ("geo-va", "1000g-va") for m in ("D-GEX", "LR", "LR-L2")
    }
    best = _best_row(table)
    assert f"lower MAE on {100 * best['lower_mae_vs_lr_l2']:.1f}% of genes" in info["caption"]
    assert "outperform" not in info["caption"] and "better" not in info["caption"]
    doc = collect_test_sets(scores=[out / "test_sets" / "heldout" / "score.json"], output=out / "tables" / "t.json")
    assert doc == json.loads((out / "tables" / "t.json").read_text())
    (entry,) = doc["test_sets"]
    assert entry["table"] == "tables/test_set_heldout.csv"
    assert entry["figures"][0]["png"] == "figures/test_set_heldout_scatter.png"
    assert (out / entry["figures"][0]["pdf"]).is_file() and entry["caption"] == info["caption"]


def test_fingerprint_mismatch_is_one_line_and_writes_nothing(world, tmp_path):
    x, y = split(world, "geo-te")
    ts = write_test_set(tmp_path / "ts" / "data.h5", x, y, "ab" * 32)
    out = tmp_path / "out"
    res = run_dgex(
        "score-test-set",
        "--test-set",
        ts,
        "--dataset",
        world["toy"]["path"],
        "--aggregate",
        world["root"] / "agg",
        "--output-dir",
        out,
        "--dgex-runs",
        *world["dgex"],
        "--baseline-runs",
        *world["base"],
    )
    assert_one_line_error(res, "dataset_fingerprint")
    assert "prepared against another dataset" in res.stderr
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_run_of_another_dataset_is_refused(world, tmp_path):
    x, y = split(world, "geo-te")
    d = tmp_path / "other" / "part0"
    d.parent.mkdir()
    import shutil

    shutil.copytree(world["dgex"][0], d)
    info = json.loads((d / "run.json").read_text())
    info["dataset_fingerprint"] = "cd" * 32
    (d / "run.json").write_text(json.dumps(info))
    ts = write_test_set(tmp_path / "ts" / "data.h5", x, y, world["fp"])
    with pytest.raises(InputError, match="trained on another dataset"):
        run_score(world, ts, tmp_path / "out", dgex_runs=[d, *world["dgex"][1:]])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, words",
    [
        ("nan", "NaN/infinite targets"),
        ("no_targets", "no targets"),
        ("fingerprint", "not a dataset's SHA-256"),
        ("shape", "2 landmarks"),
    ],
)
def test_a_damaged_test_set_is_one_line(world, tmp_path, damage, words):
    x, y = split(world, "geo-te")
    ts = write_test_set(tmp_path / "ts" / "data.h5", x[:, :2] if damage == "shape" else x, y, world["fp"])
    with h5py.File(ts, "a") as h5:
        if damage == "nan":
            h5["targets"][5, 3] = np.nan
        elif damage == "no_targets":
            del h5["targets"]
        elif damage == "fingerprint":
            h5.attrs["dataset_fingerprint"] = "unknown"
    out = tmp_path / "out"
    with pytest.raises(InputError) as exc:  # the CLI's one-line form: test_fingerprint_mismatch_is_one_line...
        run_score(world, ts, out)
    assert words in str(exc.value) and str(ts) in str(exc.value), str(exc.value)
    assert not out.exists()


def test_collect_refuses_a_missing_score_file(tmp_path):
    with pytest.raises(InputError, match="run `dgex score-test-set` first"):
        collect_test_sets(scores=[tmp_path / "nope" / "score.json"], output=tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
