"""Model bundles (`dgex export`) and inference on users' data (`dgex infer`, :func:`dgex.infer.predict`).

A toy processed dataset (20 landmarks, 16 targets in 2 parts) and two tiny
trained part runs are built once per module; expected predictions always come
from the run checkpoints themselves (``train.load_weights`` on the dataset's
standardised landmarks), never from hard-coded numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import assert_one_line_error, run_dgex  # noqa: E402
from dgex.bundle import BUNDLE_FORMAT, FORMAT_OF_KIND, export_bundle, load_bundle  # noqa: E402
from dgex.checkpoints import load_weights  # noqa: E402
from dgex.dataset import ProcessedDataset  # noqa: E402
from dgex.errors import ConfigError, InputError  # noqa: E402
from dgex.infer import infer, predict  # noqa: E402
from dgex.io import GCTXReader, write_gct, write_gctx  # noqa: E402
from dgex.train import train  # noqa: E402
from helpers_dataset import write_toy_dataset  # noqa: E402

L1000_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "l1000_lincs_n377x978.gctx"


def _train_parts(dataset, root: Path, epochs=3, parts=(0, 1)) -> list[Path]:
    dirs = []
    for p in parts:
        d = root / f"part{p}"
        # a large rate and small batches so that a few epochs give outputs that clearly depend on the inputs
        train(
            dataset=dataset,
            output_dir=d,
            layers=1,
            units=8,
            dropout=0.0,
            part=p,
            epochs=epochs,
            batch_size=20,
            lr=0.02,
            monitor_size=32,
            progress=False,
            device="cpu",
            checkpoint_interval=0,
            seed=p,
        )
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Toy dataset, two trained part runs, an exported bundle and the GEO-te landmarks on the expression scale."""
    root = tmp_path_factory.mktemp("infer")
    ds_path = write_toy_dataset(root / "toy.h5", n_tr=160, n_landmarks=20, n_targets=16, n_va=40, n_te=30, n_parts=2)[
        "path"
    ]
    # per-gene GEO statistics (the helper writes 8 +- 1 everywhere), so gene-order mix-ups would show
    rng = np.random.default_rng(7)
    with h5py.File(ds_path, "a") as h5:
        h5["stats/geo/mean"][...] = rng.uniform(4, 12, size=36)
        h5["stats/geo/std"][...] = rng.uniform(0.5, 2.0, size=36)
    runs = _train_parts(ds_path, root / "runs")
    bundle = root / "bundle"
    export_bundle(dataset=ds_path, runs=runs, output=bundle, progress=False)
    with ProcessedDataset(ds_path) as ds:
        X, genes, (mean, std), eps, ids = (
            ds.X("geo-te"),
            ds.genes(),
            ds.stats("geo"),
            ds.attrs["epsilon"],
            ds.ids("geo-te"),
        )
    L = X.shape[1]
    # the networks' own predictions, mapped back to the expression scale, are the expected output
    preds = []
    for d in runs:
        model, _ = load_weights(d / "best_geo-va.pt")
        with torch.no_grad():
            preds.append(model(torch.as_tensor(X)).numpy().astype(np.float64))
    expected = np.concatenate(preds, axis=1) * (std[L:] + eps) + mean[L:]
    x_expr = (X.astype(np.float64) * (std[:L] + eps) + mean[:L]).astype(np.float32)
    gctx = root / "geo_te.gctx"
    write_gctx(gctx, x_expr, genes.landmarks["ensembl"], ids)
    return {
        "root": root,
        "dataset": ds_path,
        "runs": runs,
        "bundle": bundle,
        "genes": genes,
        "x": x_expr,
        "ids": ids,
        "expected": expected,
        "gctx": gctx,
        "mean": mean,
        "std": std,
        "eps": eps,
    }


def _read(path) -> tuple[np.ndarray, pd.DataFrame, list, list]:
    r = GCTXReader(path)
    try:
        return r.read(), r.row_meta(), list(r.row_ids), list(r.col_ids)
    finally:
        r.close()


def _no_leftovers(folder: Path, name: str) -> None:
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}")], list(folder.iterdir())


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
def test_export_bundle_contents(toy):
    b = toy["bundle"]
    assert sorted(p.name for p in b.iterdir()) == [
        "bundle.json",
        "landmarks.tsv",
        "stats.npz",
        "targets.tsv",
        "weights_part0.pt",
        "weights_part1.pt",
    ]
    info = json.loads((b / "bundle.json").read_text())
    assert info["format_version"] == FORMAT_OF_KIND["dgex"] == 1 and info["selection"] == "geo-va"
    assert info["architecture"] == {
        "n_landmarks": 20,
        "n_targets": 16,
        "layers": 1,
        "units": 8,
        "dropout": 0.0,
        "hidden_activation": "tanh",
        "n_parts": 2,
    }
    assert set(info["files"]) == {"landmarks.tsv", "targets.tsv", "stats.npz", "weights_part0.pt", "weights_part1.pt"}
    for p, run in zip(info["parts"], toy["runs"]):
        run_json = json.loads((run / "run.json").read_text())
        assert p["epoch"] == run_json["best"]["geo-va"]["epoch"]
        assert p["metrics"]["geo-va"] == pytest.approx(run_json["best"]["geo-va"]["mae"])
    n = [p["n_targets"] for p in info["parts"]]
    assert info["metrics"]["geo-te"] == pytest.approx(
        sum(p["metrics"]["geo-te"] * k for p, k in zip(info["parts"], n)) / sum(n)
    )
    genes = toy["genes"]
    lm = pd.read_csv(b / "landmarks.tsv", sep="\t", dtype=str, keep_default_na=False)
    tg = pd.read_csv(b / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert lm["ensembl"].tolist() == genes.landmarks["ensembl"].tolist()
    assert tg["ensembl"].tolist() == genes.targets["ensembl"].tolist()
    assert tg["part"].astype(int).tolist() == genes.targets["part"].tolist()
    with np.load(b / "stats.npz") as z:
        L = len(lm)
        np.testing.assert_array_equal(z["landmark_mean"], toy["mean"][:L])
        np.testing.assert_array_equal(z["target_std"], toy["std"][L:])
        assert float(z["epsilon"]) == toy["eps"]
        assert z["landmark_quantiles"].shape == (L,) and np.all(np.diff(z["landmark_quantiles"]) >= 0)
        with ProcessedDataset(toy["dataset"]) as ds:
            np.testing.assert_array_equal(z["gene_quantiles"], ds.reference())
    blob = torch.load(b / "weights_part1.pt", weights_only=True)
    ref = torch.load(toy["runs"][1] / "best_geo-va.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(blob["state_dict"][k], ref[k]) for k in ref)


def test_export_cli_and_grid_aggregate(toy, tmp_path):
    from dgex.aggregate import aggregate

    res = run_dgex("export", "--dataset", toy["dataset"], "--runs", *toy["runs"][::-1], "--output", tmp_path / "b_cli")
    assert res.returncode == 0, res.stderr
    agg = tmp_path / "agg"
    aggregate(dgex_runs=toy["runs"], baseline_runs=[], output_dir=agg)
    # as the workflow's export rule calls it: Snakemake has already created the (empty) output folder
    (tmp_path / "b_agg").mkdir()
    res = run_dgex(
        "export",
        "--dataset",
        toy["dataset"],
        "--grid-aggregate",
        agg,
        "--selection",
        "geo-va",
        "--output",
        tmp_path / "b_agg",
        "--overwrite",
        "--no-progress",
    )
    assert res.returncode == 0, res.stderr
    info = json.loads((tmp_path / "b_agg" / "bundle.json").read_text())
    assert info["grid_choice"]["layers"] == 1 and info["grid_choice"]["units"] == 8
    for name in ("weights_part0.pt", "weights_part1.pt", "targets.tsv", "landmarks.tsv", "stats.npz"):
        a, b, c = (
            json.loads((p / "bundle.json").read_text())["files"][name]
            for p in (toy["bundle"], tmp_path / "b_cli", tmp_path / "b_agg")
        )
        assert a == b == c, name
    # an existing bundle is kept unless --overwrite
    res = run_dgex("export", "--dataset", toy["dataset"], "--runs", *toy["runs"], "--output", tmp_path / "b_cli")
    assert_one_line_error(res, "exists", "--overwrite")


def test_export_rejects_bad_runs(toy, tmp_path):
    ds, (r0, r1) = toy["dataset"], toy["runs"]
    with pytest.raises(InputError, match=r"part\(s\) 1 missing"):
        export_bundle(dataset=ds, runs=[r0], output=tmp_path / "b")
    with pytest.raises(InputError, match="given more than once"):
        export_bundle(dataset=ds, runs=[r0, r0, r1], output=tmp_path / "b")
    with pytest.raises(InputError, match="no run.json"):
        export_bundle(dataset=ds, runs=[r0, tmp_path], output=tmp_path / "b")
    # runs trained on other genes than the dataset's
    other = write_toy_dataset(
        tmp_path / "other.h5", n_tr=40, n_landmarks=21, n_targets=16, n_va=10, n_te=10, with_rnaseq=False
    )["path"]
    with pytest.raises(InputError, match="use the dataset the model was trained on"):
        export_bundle(dataset=other, runs=[r0, r1], output=tmp_path / "b")
    assert not any(p.name.startswith((".b", "b")) for p in tmp_path.iterdir())


# --------------------------------------------------------------------------- #
# inference
# --------------------------------------------------------------------------- #
def test_roundtrip_cli_reproduces_networks(toy, tmp_path):
    out = tmp_path / "pred.gctx"
    res = run_dgex("infer", "--model", toy["bundle"], "--input", toy["gctx"], "--output", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    data, row_meta, rows, cols = _read(out)
    np.testing.assert_allclose(data, toy["expected"], rtol=1e-5, atol=1e-5)
    assert rows == toy["genes"].targets["ensembl"].tolist()
    assert cols == list(toy["ids"])
    assert row_meta["pr_gene_symbol"].tolist() == toy["genes"].targets["symbol"].tolist()
    assert row_meta["pr_gene_id"].tolist() == toy["genes"].targets["entrez"].tolist()
    # an existing output is refused without --overwrite, and kept intact
    before = out.read_bytes()
    res = run_dgex("infer", "--model", toy["bundle"], "--input", toy["gctx"], "--output", out)
    assert_one_line_error(res, "exists", "--overwrite")
    assert out.read_bytes() == before


@pytest.mark.parametrize("id_type", ["entrez", "symbol", "ensembl"])
def test_id_types_shuffled_rows_and_extra_rows(toy, tmp_path, id_type):
    lm = toy["genes"].landmarks
    ids = lm[id_type].tolist()
    if id_type == "ensembl":
        ids = [f"{i}.7" for i in ids]  # GENCODE-style version suffixes are dropped
    if id_type == "symbol":
        ids = [i.lower() for i in ids]  # symbols match case-insensitively
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(ids))
    extra = rng.normal(8, 1, size=(len(toy["x"]), 3)).astype(np.float32)
    data = np.hstack([toy["x"][:, perm], extra])
    row_ids = [ids[i] for i in perm] + ["EXTRA1", "99999999", "ENSG00000000000"]
    path = tmp_path / f"in_{id_type}.gctx"
    write_gctx(path, data, row_ids, toy["ids"])
    for given in ("auto", id_type):
        out = tmp_path / f"out_{given}.gctx"
        summary = infer(model=toy["bundle"], input=path, output=out, id_type=given, progress=False)
        assert summary["id_type"] == id_type and summary["landmarks_present"] == 20
        np.testing.assert_allclose(_read(out)[0], toy["expected"], rtol=1e-5, atol=1e-5)


def test_chunk_and_batch_size_do_not_change_result(toy, tmp_path):
    outs = []
    for i, (chunk, batch) in enumerate([(10_000, 4096), (7, 3), (1, 1)]):
        out = tmp_path / f"p{i}.gctx"
        infer(model=toy["bundle"], input=toy["gctx"], output=out, chunk_size=chunk, batch_size=batch, progress=False)
        outs.append(_read(out)[0])
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-6, atol=1e-6)


def test_text_inputs_and_outputs(toy, tmp_path):
    gct = tmp_path / "in.gct"
    write_gct(gct, toy["x"], toy["genes"].landmarks["ensembl"], toy["ids"])
    out = tmp_path / "pred.csv"
    infer(model=toy["bundle"], input=gct, output=out, progress=False)
    df = pd.read_csv(out, dtype={"pr_gene_id": str})
    assert list(df.columns[:6]) == ["id", "pr_gene_id", "pr_gene_symbol", "pr_ensembl_id", "pr_probe_id", "part"]
    assert df["id"].tolist() == toy["genes"].targets["ensembl"].tolist()
    # GCT text keeps 6 significant digits of the inputs
    np.testing.assert_allclose(df[list(toy["ids"])].to_numpy().T, toy["expected"], rtol=1e-4, atol=1e-4)


def test_csv_refused_for_large_inputs_unless_forced(toy, tmp_path, monkeypatch):
    import dgex.infer as inf

    monkeypatch.setattr(inf, "MAX_TEXT_SAMPLES", 10)
    with pytest.raises(InputError, match="--force"):
        infer(model=toy["bundle"], input=toy["gctx"], output=tmp_path / "p.csv", progress=False)
    infer(model=toy["bundle"], input=toy["gctx"], output=tmp_path / "p.csv", progress=False, force=True)
    assert (tmp_path / "p.csv").exists()
    with pytest.raises(ConfigError, match="parquet output is not offered"):  # no pyarrow dependency
        infer(model=toy["bundle"], input=toy["gctx"], output=tmp_path / "p.parquet", progress=False)


def test_predict_api(toy):
    bundle = load_bundle(toy["bundle"])
    np.testing.assert_allclose(predict(bundle, toy["x"]), toy["expected"], rtol=1e-5, atol=1e-5)
    # a DataFrame of samples x genes, any id type, any column order -> DataFrame samples x targets
    lm = toy["genes"].landmarks
    df = pd.DataFrame(toy["x"], columns=lm["symbol"], index=toy["ids"]).iloc[:, ::-1]
    out = predict(str(toy["bundle"]), df, device="cpu")
    assert list(out.columns) == toy["genes"].targets["ensembl"].tolist() and list(out.index) == list(toy["ids"])
    np.testing.assert_allclose(out.to_numpy(), toy["expected"], rtol=1e-5, atol=1e-5)
    with pytest.raises(InputError, match="shape"):
        predict(bundle, toy["x"][:, :5])


def test_quantile_normalize_uses_landmark_reference(toy, tmp_path):
    """Rank mapping makes predictions invariant to monotone per-sample distortions of the input."""
    bundle = load_bundle(toy["bundle"])
    ref = bundle.stats["landmark_quantiles"]
    x = toy["x"]
    distorted = (2.0 * np.cbrt(x) + 5.0).astype(np.float32)  # monotone: keeps every sample's ranks
    a = predict(bundle, x, quantile_normalize=True)
    b = predict(bundle, distorted, quantile_normalize=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # equals predicting on the rank-mapped inputs
    ranks = np.argsort(np.argsort(x, axis=1), axis=1)
    np.testing.assert_allclose(a, predict(bundle, ref[ranks].astype(np.float32)), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# missing landmarks
# --------------------------------------------------------------------------- #
def test_missing_landmarks_error_and_mean_imputation(toy, tmp_path):
    lm = toy["genes"].landmarks
    drop = [2, 5, 11]
    keep = [i for i in range(len(lm)) if i not in drop]
    path = tmp_path / "partial.gctx"
    write_gctx(path, toy["x"][:, keep], lm["ensembl"].iloc[keep], toy["ids"])
    out = tmp_path / "pred.gctx"
    res = run_dgex("infer", "--model", toy["bundle"], "--input", path, "--output", out)
    err = assert_one_line_error(res, "3 of the model's 20 landmark genes are missing", "--impute-missing mean")
    assert all(lm["symbol"].iloc[i] in err for i in drop)
    _no_leftovers(tmp_path, "pred.gctx")

    summary = infer(model=toy["bundle"], input=path, output=out, impute_missing="mean", progress=False)
    assert summary["landmarks_imputed"] == 3
    # imputing the training mean == giving the missing landmarks their GEO mean expression
    filled = toy["x"].copy()
    filled[:, drop] = toy["mean"][drop]
    np.testing.assert_allclose(_read(out)[0], predict(load_bundle(toy["bundle"]), filled), rtol=1e-5, atol=1e-5)

    # fewer than half present is an error even with imputation
    few = tmp_path / "few.gctx"
    write_gctx(few, toy["x"][:, :9], lm["ensembl"].iloc[:9], toy["ids"])
    with pytest.raises(InputError, match="only 9 of the model's 20 landmark genes"):
        infer(model=toy["bundle"], input=few, output=tmp_path / "few_pred.gctx", impute_missing="mean", progress=False)
    _no_leftovers(tmp_path, "few_pred.gctx")


# --------------------------------------------------------------------------- #
# bad input
# --------------------------------------------------------------------------- #
def test_unknown_gene_ids(toy, tmp_path):
    path = tmp_path / "weird.gctx"
    write_gctx(path, toy["x"], [f"gene_{i}" for i in range(20)], toy["ids"])
    res = run_dgex("infer", "--model", toy["bundle"], "--input", path, "--output", tmp_path / "o.gctx")
    assert_one_line_error(res, "cannot recognise the gene ids", "gene_0", "--id-type")
    with pytest.raises(InputError, match="none of the gene ids"):
        infer(model=toy["bundle"], input=toy["gctx"], output=tmp_path / "o.gctx", id_type="entrez", progress=False)
    _no_leftovers(tmp_path, "o.gctx")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values_name_the_samples(toy, tmp_path, bad):
    x = toy["x"].copy()
    x[17, 4] = bad
    path = tmp_path / "bad.gctx"
    write_gctx(path, x, toy["genes"].landmarks["ensembl"], toy["ids"])
    # chunk 5: the error comes after earlier chunks were written; no output may remain
    with pytest.raises(InputError, match=f"NaN or Inf.*{toy['ids'][17]}"):
        infer(model=toy["bundle"], input=path, output=tmp_path / "o.gctx", chunk_size=5, batch_size=2, progress=False)
    _no_leftovers(tmp_path, "o.gctx")


def test_linear_scale_input_is_refused(toy, tmp_path):
    path = tmp_path / "linear.gctx"
    write_gctx(path, 2.0 ** toy["x"], toy["genes"].landmarks["ensembl"], toy["ids"])
    with pytest.raises(InputError, match="linear-scale"):
        infer(model=toy["bundle"], input=path, output=tmp_path / "o.gctx", progress=False)
    _no_leftovers(tmp_path, "o.gctx")


def _copy_bundle(toy, tmp_path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(toy["bundle"], dst)
    return dst


def test_bundle_from_another_format_version(toy, tmp_path):
    b = _copy_bundle(toy, tmp_path)
    info = json.loads((b / "bundle.json").read_text())
    info["format_version"] = BUNDLE_FORMAT + 1
    (b / "bundle.json").write_text(json.dumps(info))
    res = run_dgex("infer", "--model", b, "--input", toy["gctx"], "--output", tmp_path / "o.gctx")
    assert_one_line_error(res, f"bundle format version {BUNDLE_FORMAT + 1}", "re-export")
    _no_leftovers(tmp_path, "o.gctx")


def test_bundle_files_disagree(toy, tmp_path):
    b = _copy_bundle(toy, tmp_path)
    lm = (b / "landmarks.tsv").read_text().splitlines()
    (b / "landmarks.tsv").write_text("\n".join(lm[:-1]) + "\n")  # one landmark fewer than the weights
    with pytest.raises(InputError, match="bundle files disagree.*landmarks.tsv has 19"):
        load_bundle(b)
    shutil.rmtree(b)
    b = _copy_bundle(toy, tmp_path)
    w0 = torch.load(b / "weights_part0.pt", weights_only=True)
    w0["shape"][1] += 1  # a network with one output more than its part has targets
    torch.save(w0, b / "weights_part0.pt")
    with pytest.raises(InputError, match="bundle files disagree: weights_part0.pt maps 20 -> 9 genes"):
        load_bundle(b)


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_stats", "garbage_json", "delete_targets"])
def test_corrupt_bundle(toy, tmp_path, damage):
    b = _copy_bundle(toy, tmp_path)
    if damage == "truncate_weights":
        data = (b / "weights_part0.pt").read_bytes()
        (b / "weights_part0.pt").write_bytes(data[: len(data) // 2])
        fragment = "corrupt model bundle"
    elif damage == "flip_stats":
        with np.load(b / "stats.npz") as z:
            stats = {k: z[k] for k in z.files}
        stats["target_mean"] = stats["target_mean"] + 1.0  # same sizes: only the checksum can tell
        np.savez(b / "stats.npz", **stats)
        fragment = "does not match its checksum"
    elif damage == "garbage_json":
        (b / "bundle.json").write_text("{not json")
        fragment = "corrupt model bundle"
    else:
        (b / "targets.tsv").unlink()
        fragment = "missing file(s) targets.tsv"
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        infer(model=b, input=toy["gctx"], output=tmp_path / "o.gctx", progress=False)
    _no_leftovers(tmp_path, "o.gctx")


def test_not_a_bundle(toy, tmp_path):
    res = run_dgex("infer", "--model", tmp_path, "--input", toy["gctx"], "--output", tmp_path / "o.gctx")
    assert_one_line_error(res, "not a dgex model bundle")


# --------------------------------------------------------------------------- #
# the real L1000 file
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(not L1000_FILE.exists(), reason=f"real L1000 file not present at {L1000_FILE}")
def test_real_l1000_file(tmp_path):
    """A model on the real 943 D-GEX landmarks predicts all targets for the 377 real L1000 profiles."""
    from dgex.demo import generate
    from dgex.preprocess import preprocess

    generate(output_dir=tmp_path / "demo", n_geo=200, n_duplicates=0, max_targets=40, n_1000g=10, n_gtex=10)
    ds = tmp_path / "ds.h5"
    preprocess(geo=tmp_path / "demo" / "geo.gctx", output=ds, max_targets=40, dedup=False, progress=False)
    runs = _train_parts(ds, tmp_path / "runs", epochs=1)
    export_bundle(dataset=ds, runs=runs, output=tmp_path / "bundle")
    out = tmp_path / "l1000_pred.gctx"
    res = run_dgex("infer", "--model", tmp_path / "bundle", "--input", L1000_FILE, "--output", out, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "probe ids" in res.stderr and "943/943 landmarks" in res.stderr
    data, row_meta, rows, cols = _read(out)
    with ProcessedDataset(ds) as d:
        targets = d.genes().targets
    with GCTXReader(L1000_FILE) as r:
        l1000_cols = list(r.col_ids)
        n_col_meta = len(r.col_meta().columns)
    assert data.shape == (377, len(targets)) and np.isfinite(data).all()
    assert rows == targets["ensembl"].tolist() and cols == l1000_cols
    with GCTXReader(out) as r:
        own = [c for c in r.col_meta().columns if not c.startswith("dgex_")]  # dgex_*: provenance
        assert len(own) == n_col_meta  # the samples' metadata travel along
    # Entrez ids from the file's own row metadata give the same predictions as its probe ids
    with GCTXReader(L1000_FILE) as r:
        x, entrez = r.read(), r.row_meta()["pr_gene_id"].astype(str).tolist()
    by_entrez = tmp_path / "entrez.gctx"
    write_gctx(by_entrez, x, entrez, l1000_cols)
    infer(model=tmp_path / "bundle", input=by_entrez, output=tmp_path / "p2.gctx", progress=False)
    np.testing.assert_allclose(_read(tmp_path / "p2.gctx")[0], data, rtol=1e-6, atol=1e-6)


def test_imports_flow_one_way():
    """Layering (README, 'Code layout'): a module imports only its own layer or those below, without cycles,
    and never a private name of another module."""
    import ast
    from pathlib import Path

    import dgex

    layers = {
        "foundations": {"errors", "io", "settings", "devices", "genes", "dataset", "runs", "metrics", "plotting"},
        "network": {"models"},
        "training": {"checkpoints", "training.plan", "training.callbacks", "training.data", "training.logger"},
        "stages": {"demo", "acquire", "preprocess", "train", "baselines", "aggregate", "tables", "figures"}
        | {"interpret", "bundle", "infer", "report", "evaluate", "test_sets"},
        "cli": {"cli", "__main__"},
    }
    rank = {m: r for r, mods in enumerate(layers.values()) for m in mods}
    src = Path(dgex.__file__).parent
    graph = {}
    for path in [*src.glob("*.py"), *src.glob("training/*.py")]:
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        if name in ("__init__", "training.__init__"):
            continue
        package = name.rsplit(".", 1)[0] if "." in name else ""
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level >= 1):
                continue
            base = package.split(".")[: max(0, len(package.split(".")) - (node.level - 1))] if package else []
            target = ".".join([*base, node.module] if node.module else base)
            private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]
            assert not private, f"{name} imports private {private} from {target or 'dgex'}"
            for dep in [target] if node.module else [".".join([*base, a.name]) for a in node.names]:
                if dep in rank:
                    deps.add(dep)
        assert name in rank, f"{name} is in no layer: add it to README 'Code layout' and this test"
        for dep in deps:
            assert rank[dep] <= rank[name], f"{name} ({rank[name]}) imports {dep} ({rank[dep]}), a layer above"
        graph[name] = deps
    done = set()

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join([*stack, node])}"
        if node in done:
            return
        for dep in graph.get(node, ()):
            visit(dep, [*stack, node])
        done.add(node)

    for node in graph:
        visit(node, [])
