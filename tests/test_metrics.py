"""dgex.metrics against scipy/numpy references; the per-gene table round trip; summaries."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dgex import metrics
from dgex.errors import InputError
from dgex.metrics import (
    PER_GENE_COLUMNS,
    bootstrap_ci,
    compare,
    overall,
    per_gene_frame,
    per_gene_mae,
    per_gene_pearson,
    per_gene_spearman,
    read_per_gene,
    write_per_gene,
)


def _pair(n=60, g=25, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n, g))
    yhat = y + rng.normal(scale=0.7, size=(n, g))
    if ties:  # integer values give many tied ranks
        y, yhat = np.round(y * 2), np.round(yhat * 2)
    return y.astype(np.float32), yhat.astype(np.float32)


def _targets(g, n_overlap=3):
    return pd.DataFrame(
        {
            "ensembl": [f"ENSG{i}" for i in range(g)],
            "symbol": ["NA"] + [f"G{i}" for i in range(1, g)],
            "entrez": [str(100 + i) for i in range(g)],
            "part": np.sort(np.arange(g) % 2),
            "overlap": np.arange(g) < n_overlap,
        }
    )


@pytest.mark.parametrize("ties", [False, True])
def test_per_gene_metrics_match_scipy(ties, monkeypatch):
    y, yhat = _pair(ties=ties)
    ref_mae = np.array([np.mean(np.abs(y[:, j].astype(float) - yhat[:, j])) for j in range(y.shape[1])])
    ref_r = np.array([stats.pearsonr(y[:, j], yhat[:, j])[0] for j in range(y.shape[1])])
    ref_rho = np.array([stats.spearmanr(y[:, j], yhat[:, j])[0] for j in range(y.shape[1])])
    for block in (metrics._BLOCK_ELEMENTS, 120):  # one block and several column blocks
        monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", block)
        mae, r, rho = per_gene_mae(y, yhat), per_gene_pearson(y, yhat), per_gene_spearman(y, yhat)
        assert mae.dtype == r.dtype == rho.dtype == np.float64 and mae.shape == (y.shape[1],)
        np.testing.assert_allclose(mae, ref_mae, rtol=1e-6)
        np.testing.assert_allclose(r, ref_r, atol=1e-6)
        np.testing.assert_allclose(rho, ref_rho, atol=1e-6)


def test_constant_columns_give_nan_without_warnings():
    y, yhat = _pair(n=30, g=5)
    y[:, 1] = 0.1  # constant truth (a float mean of it is not exactly 0.1)
    yhat[:, 3] = -2.0  # constant prediction
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r, rho, mae = per_gene_pearson(y, yhat), per_gene_spearman(y, yhat), per_gene_mae(y, yhat)
    assert np.isnan(r[[1, 3]]).all() and np.isnan(rho[[1, 3]]).all()
    assert np.isfinite(r[[0, 2, 4]]).all() and np.isfinite(mae).all()


def test_shape_mismatch_is_one_line_error():
    with pytest.raises(InputError) as exc:
        per_gene_mae(np.zeros((3, 4)), np.zeros((3, 5)))
    assert "\n" not in str(exc.value)


def test_per_gene_frame_round_trip(tmp_path):
    y, yhat = _pair(g=6)
    y[:, 2] = 1.0  # NaN correlations must survive the CSV
    frame = per_gene_frame(_targets(6), "LR", "geo-va", "geo-te", y, yhat)
    assert list(frame.columns) == PER_GENE_COLUMNS and len(frame) == 6
    path = tmp_path / "run" / "per_gene.csv"
    write_per_gene(path, frame)
    back = read_per_gene(path)
    assert list(back.columns) == PER_GENE_COLUMNS
    assert back["symbol"].iloc[0] == "NA" and back["entrez"].iloc[0] == "100"  # ids stay strings
    assert back["overlap"].dtype == bool and back["overlap"].tolist() == frame["overlap"].tolist()
    assert np.isnan(back["r"].iloc[2]) and np.isnan(back["rho"].iloc[2])
    np.testing.assert_allclose(back["mae"], frame["mae"], rtol=1e-7)
    assert not list(path.parent.glob(".*tmp"))


def test_per_gene_frame_checks_targets():
    y, yhat = _pair(g=6)
    with pytest.raises(InputError, match="6 predicted columns"):
        per_gene_frame(_targets(5), "LR", "geo-va", "geo-te", y, yhat)


def test_read_per_gene_names_missing_columns(tmp_path):
    path = tmp_path / "per_gene.csv"
    pd.DataFrame({"method": ["LR"], "split": ["geo-te"], "mae": [0.3]}).to_csv(path, index=False)
    with pytest.raises(InputError) as exc:
        read_per_gene(path)
    msg = str(exc.value)
    assert "\n" not in msg
    named = msg.split("lacks column(s) ")[1].split(";")[0].split(", ")
    assert set(named) == set(PER_GENE_COLUMNS) - {"method", "split", "mae"}
    with pytest.raises(InputError, match="not found"):
        read_per_gene(tmp_path / "nope.csv")


def test_overall_with_and_without_overlap():
    y, yhat = _pair(g=8)
    frame = per_gene_frame(_targets(8, n_overlap=3), "LR", "geo-va", "geo-te", y, yhat)
    all_genes = overall(frame)
    assert all_genes["n_genes"] == 8
    assert all_genes["mae_mean"] == pytest.approx(frame["mae"].mean())
    assert all_genes["mae_std"] == pytest.approx(frame["mae"].std(ddof=0))
    assert all_genes["r_mean"] == pytest.approx(frame["r"].mean())
    assert all_genes["rho_mean"] == pytest.approx(frame["rho"].mean())
    no = overall(frame, exclude_overlap=True)
    assert no["n_genes"] == 5 and no["mae_mean"] == pytest.approx(frame["mae"][3:].mean())
    # an array works too; overlap flags are needed only to exclude
    arr = overall(frame["mae"].to_numpy())
    assert arr["mae_mean"] == pytest.approx(all_genes["mae_mean"]) and arr["r_mean"] is None
    assert overall(frame["mae"].to_numpy(), True, overlap=frame["overlap"])["n_genes"] == 5
    with pytest.raises(InputError, match="overlap"):
        overall(frame["mae"].to_numpy(), exclude_overlap=True)
    with pytest.raises(InputError, match="2 evaluations"):
        overall(pd.concat([frame, frame.assign(split="gtex-te")]))


def test_compare_matches_wilcoxon():
    rng = np.random.default_rng(1)
    b = rng.uniform(0.3, 0.6, 200)
    a = b - rng.normal(0.02, 0.03, 200)
    out = compare(a, b)
    assert out["a_wins"] == pytest.approx(np.mean(a < b))
    assert out["b_wins"] == pytest.approx(np.mean(a > b))
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert out["rel_improvement"] == pytest.approx((b.mean() - a.mean()) / b.mean())
    assert out["n_genes"] == 200 and out["wilcoxon_p"] < 1e-6
    same = compare(b, b)
    assert same["wilcoxon_p"] == 1.0 and same["a_wins"] == 0.0 and same["rel_improvement"] == 0.0
    with pytest.raises(InputError, match="align"):
        compare(a, b[:-1])


def test_bootstrap_ci_contains_mean_and_narrows():
    rng = np.random.default_rng(2)
    small, large = rng.gamma(4, 0.1, 200), rng.gamma(4, 0.1, 5000)
    lo, hi = bootstrap_ci(small, n_boot=1000, seed=0)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large, n_boot=1000, seed=0)
    assert lo2 < large.mean() < hi2
    assert (hi2 - lo2) < 0.5 * (hi - lo)  # sqrt(25) = 5x narrower in expectation
    assert bootstrap_ci(small, n_boot=1000, seed=0) == (lo, hi)  # seeded
    # roughly the normal-theory width
    se = small.std(ddof=1) / np.sqrt(small.size)
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)
    with pytest.raises(InputError):
        bootstrap_ci([np.nan])
