"""Per-target reliability in bundles and inferred outputs (issue 13): metrics per split, well_inferred, preference."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import assert_one_line_error, run_dgex
from dgex.baselines import run_baseline
from dgex.bundle import RELIABILITY_COLUMNS, export_bundle, load_bundle
from dgex.dataset import ProcessedDataset
from dgex.errors import InputError
from dgex.infer import infer
from dgex.io import write_gctx
from dgex.metrics import read_per_gene
from dgex.train import train
from helpers_dataset import write_toy_dataset

README = Path(__file__).resolve().parents[1] / "README.md"
METRICS = ("mae", "r", "rho")
SPLITS = ("geo-va", "geo-te", "1000g-va", "gtex-te")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Toy dataset; a D-GEX bundle of two trained parts and an LR-L2 bundle; GEO-te landmarks as a GCTX input."""
    root = tmp_path_factory.mktemp("rel")
    ds = write_toy_dataset(root / "ds.h5", n_tr=60, n_landmarks=12, n_targets=16, noise=1.0, n_va=40, n_te=40)["path"]
    parts = []
    for p in (0, 1):
        train(dataset=ds, output_dir=root / f"part{p}", layers=1, units=8, dropout=0.0, part=p, epochs=3,
              batch_size=20, lr=0.02, monitor_size=32, progress=False, device="cpu", checkpoint_interval=0, seed=p)  # fmt: skip
        parts.append(root / f"part{p}")
    run_baseline("ridge", ds, root / "ridge", n_jobs=1, progress=False)
    dgex_b, ridge_b = root / "model", root / "model_lr-l2"
    export_bundle(dataset=ds, runs=parts, output=dgex_b, progress=False)
    export_bundle(dataset=ds, baseline_run=root / "ridge", output=ridge_b, progress=False)
    with ProcessedDataset(ds) as d:
        X, (mean, std), eps, ids, genes = d.X("geo-te"), d.stats("geo"), d.attrs["epsilon"], d.ids("geo-te"), d.genes()
    gctx = root / "in.gctx"
    write_gctx(gctx, (X * (std[:12] + eps) + mean[:12]).astype(np.float32), genes.landmarks["ensembl"], ids)
    per_gene = {
        "dgex": pd.concat([read_per_gene(p / "per_gene.csv") for p in parts], ignore_index=True),
        "ridge": read_per_gene(root / "ridge" / "per_gene.csv"),
    }
    return {"root": root, "dataset": ds, "bundles": {"dgex": dgex_b, "ridge": ridge_b}, "gctx": gctx,
            "per_gene": per_gene, "targets": list(genes.targets["ensembl"])}  # fmt: skip


def _expected(setup, kind: str, selection: str = "geo-va") -> pd.DataFrame:
    """The reliability the bundle should carry: per_gene.csv's rows for ``selection``, one column per metric x split."""
    pg = setup["per_gene"][kind]
    pg = pg[pg.selected_by == selection]
    cols = {}
    for split in SPLITS:
        rows = pg[pg.split == split].set_index("ensembl").loc[setup["targets"]]
        for m in METRICS:
            cols[f"{m}_{split.replace('-', '_')}"] = rows[m].to_numpy()
    return pd.DataFrame(cols, index=setup["targets"])


@pytest.mark.parametrize("kind", ["dgex", "ridge"])
def test_bundle_carries_the_runs_per_gene_metrics(setup, kind):
    b = load_bundle(setup["bundles"][kind])
    assert b.reliability_columns == RELIABILITY_COLUMNS  # every split of the toy dataset, all three metrics
    got = b.targets.set_index("id")[RELIABILITY_COLUMNS]
    exp = _expected(setup, kind).loc[got.index]
    np.testing.assert_allclose(got.to_numpy(), exp.to_numpy(), rtol=1e-12)
    assert np.isfinite(got.to_numpy()).all()


def test_gctx_row_metadata_readable_by_cmappy(setup, tmp_path):
    from cmapPy.pandasGEXpress.parse import parse

    out = tmp_path / "p.gctx"
    infer(model=setup["bundles"]["ridge"], input=setup["gctx"], output=out, device="cpu", progress=False)
    gct = parse(str(out))
    meta = gct.row_metadata_df
    exp = _expected(setup, "ridge").loc[meta.index]
    for c in RELIABILITY_COLUMNS:
        np.testing.assert_allclose(meta[c].astype(float).to_numpy(), exp[c].to_numpy(), rtol=1e-6, err_msg=c)
    # default criterion: Pearson r >= 0.5 on GEO-te, from per_gene.csv independently
    flag = (exp["r_geo_te"] >= 0.5).astype(int)
    assert 0 < flag.sum() < len(flag)  # both kinds of genes in the toy data: the check can fail either way
    np.testing.assert_array_equal(meta["well_inferred"].astype(int).to_numpy(), flag.to_numpy())


def test_text_output_companion_columns(setup, tmp_path):
    out = tmp_path / "p.csv"
    res = run_dgex("infer", "--model", setup["bundles"]["dgex"], "--input", setup["gctx"], "--output", out,
                   "--well-inferred", "mae_geo_va<=0.8", "--no-progress", "--device", "cpu")  # fmt: skip
    assert res.returncode == 0, res.stderr
    table = pd.read_csv(out, dtype={"id": str}).set_index("id")
    exp = _expected(setup, "dgex").loc[table.index]
    for c in RELIABILITY_COLUMNS:
        np.testing.assert_allclose(table[c].to_numpy(), exp[c].to_numpy(), rtol=1e-5, err_msg=c)
    flag = (exp["mae_geo_va"] <= 0.8).astype(int)
    assert 0 < flag.sum() < len(flag)
    np.testing.assert_array_equal(table["well_inferred"].to_numpy(), flag.to_numpy())
    assert "well_inferred (mae_geo_va<=0.8)" in res.stderr and "kind dgex: D-GEX 1x8" in res.stderr


def test_landmark_rows_are_not_flagged(setup, tmp_path):
    out = tmp_path / "p.csv"
    infer(model=setup["bundles"]["ridge"], input=setup["gctx"], output=out, include_landmarks=True,
          device="cpu", progress=False)  # fmt: skip
    table = pd.read_csv(out)
    lm = table[table["pr_is_lm"] == 1]
    assert len(lm) == 12 and (lm["well_inferred"] == 0).all() and lm["r_geo_te"].isna().all()


def test_no_flag_on_request_and_bad_criteria(setup, tmp_path):
    out = tmp_path / "p.csv"
    infer(model=setup["bundles"]["ridge"], input=setup["gctx"], output=out, well_inferred="none",
          device="cpu", progress=False)  # fmt: skip
    assert "well_inferred" not in pd.read_csv(out).columns
    for bad in ("r_geo_te > 0.5", "r_geo_te>=x"):  # not the form: argparse refuses it, exit 2
        res = run_dgex("infer", "--model", setup["bundles"]["ridge"], "--input", setup["gctx"],
                       "--output", tmp_path / "q.csv", "--well-inferred", bad)  # fmt: skip
        assert res.returncode == 2 and "argument --well-inferred: must be <column> >= <number>" in res.stderr
        assert "Traceback" not in res.stderr and not (tmp_path / "q.csv").exists()
    res = run_dgex("infer", "--model", setup["bundles"]["ridge"], "--input", setup["gctx"],
                   "--output", tmp_path / "q.csv", "--well-inferred", "pearson>=0.5")  # fmt: skip
    assert_one_line_error(res, "--well-inferred 'pearson>=0.5'", "r_geo_te>=0.5")
    assert not (tmp_path / "q.csv").exists()


def test_criterion_on_a_split_the_model_was_not_scored_on(tmp_path):
    ds = write_toy_dataset(tmp_path / "ds.h5", n_tr=60, n_landmarks=8, n_targets=6, with_rnaseq=False)["path"]
    run_baseline("lr", ds, tmp_path / "lr", n_jobs=1, progress=False)
    export_bundle(dataset=ds, baseline_run=tmp_path / "lr", output=tmp_path / "b", progress=False)
    assert load_bundle(tmp_path / "b").reliability_columns == [
        f"{m}_{s}" for s in ("geo_va", "geo_te") for m in METRICS
    ]
    with ProcessedDataset(ds) as d:
        write_gctx(tmp_path / "in.gctx", d.X("geo-te") + 8.0, d.genes().landmarks["ensembl"], d.ids("geo-te"))
    res = run_dgex("infer", "--model", tmp_path / "b", "--input", tmp_path / "in.gctx", "--output",
                   tmp_path / "p.csv", "--well-inferred", "r_gtex_te>=0.5")  # fmt: skip
    assert_one_line_error(res, "not scored on that split", "r_geo_te")


def test_reliability_values_that_are_not_numbers_are_refused(setup, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(setup["bundles"]["ridge"], b)
    tg = pd.read_csv(b / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
    tg.loc[3, "r_geo_te"] = "high"
    tg.to_csv(b / "targets.tsv", sep="\t", index=False)
    info = json.loads((b / "bundle.json").read_text())
    import hashlib

    info["files"]["targets.tsv"] = hashlib.sha256((b / "targets.tsv").read_bytes()).hexdigest()
    (b / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(InputError, match="targets.tsv column r_geo_te holds values that are not numbers"):
        load_bundle(b)


def test_readme_snippet_keeps_only_well_inferred_genes(setup, tmp_path):
    """The README's cmapPy/pandas snippet, run as written on a real output."""
    text = README.read_text()
    block = re.search(r"<!-- well-inferred snippet -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README lacks the well-inferred snippet"
    out = tmp_path / "predicted.gctx"
    infer(model=setup["bundles"]["ridge"], input=setup["gctx"], output=out, device="cpu", progress=False)
    scope: dict = {}
    code = block.group(1).replace('"predicted.gctx"', repr(str(out)))
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 -- the documented snippet itself
    exp = _expected(setup, "ridge")
    keep = sorted(exp.index[exp["r_geo_te"] >= 0.5])
    assert sorted(scope["trusted"].index) == keep and scope["trusted"].shape[1] == 40


# --------------------------------------------------------------------------- #
# which model validation prefers
# --------------------------------------------------------------------------- #
def test_preferred_model_is_the_lower_validation_mae(setup, tmp_path):
    b = setup["bundles"]
    mae = {k: float(_expected(setup, k)["mae_geo_va"].mean()) for k in b}  # from per_gene.csv, independently
    want = min(mae, key=mae.get)
    for order in (["dgex", "ridge"], ["ridge", "dgex"]):
        out = tmp_path / f"pref_{order[0]}.json"
        res = run_dgex("prefer-model", "--bundles", *(b[k] for k in order), "--output", out)
        assert res.returncode == 0, res.stderr
        got = json.loads(out.read_text())
        assert got["preferred"] == str(b[want]) and got["selection"] == "geo-va"
        assert got["preferred_kind"] == ("dgex" if want == "dgex" else "linear")
        for c in got["candidates"]:
            key = "dgex" if c["kind"] == "dgex" else "ridge"
            assert c["validation_mae"] == pytest.approx(mae[key], rel=1e-9)


def test_preferred_model_needs_one_selection(setup, tmp_path):
    other = tmp_path / "cross"
    export_bundle(dataset=setup["dataset"], baseline_run=setup["root"] / "ridge", output=other,
                  selection="1000g-va", progress=False)  # fmt: skip
    res = run_dgex("prefer-model", "--bundles", setup["bundles"]["dgex"], other, "--output", tmp_path / "p.json")
    assert_one_line_error(res, "selected on different splits")
    assert not (tmp_path / "p.json").exists()
