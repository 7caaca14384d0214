"""Sample filters by column metadata and test-set preparation (issue 13): each protocol against an oracle
built independently here (numpy/scipy), probe and gene kinds, two-source sets paired by sample id, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from scipy.stats import rankdata

from conftest import REPO, assert_one_line_error, run_dgex
from dgex.dataset import ProcessedDataset
from dgex.errors import InputError
from dgex.io import write_gctx, write_tsv
from dgex.preprocess import preprocess
from dgex.test_sets import prepare_test_set, read_test_set

STUDIES = ("alpha", "beta", "gamma")


# ------------------------------------------------------------------ fixtures
def make_studies(path, probes, n_per_study=(120, 100, 40), seed=0):
    """Probe-level GCTX whose columns carry ``dataset`` (study) and ``label`` metadata; returns (data, ids, meta)."""
    rng = np.random.default_rng(seed)
    n = sum(n_per_study)
    z = rng.normal(size=(n, 3))
    load = rng.normal(size=(3, len(probes)))
    data = (8 + z @ load * 0.8 + rng.normal(scale=0.3, size=(n, len(probes)))).astype(np.float32)
    ids = [f"S{i:04d}" for i in range(n)]
    dataset = np.repeat(STUDIES, n_per_study)
    meta = pd.DataFrame({"dataset": dataset, "label": np.where(np.arange(n) % 2, "case", "control")}, index=ids)
    write_gctx(path, data, probes, ids, col_meta=meta)
    return data, ids, meta


@pytest.fixture
def studies(tmp_path, tiny_maps):
    data, ids, meta = make_studies(tmp_path / "geo.gctx", tiny_maps["probes"])
    return {"path": tmp_path / "geo.gctx", "data": data, "ids": ids, "meta": meta, **tiny_maps}


def build(tmp_path, maps, name="ds.h5", **kw):
    args = dict(
        geo=maps["path"],
        output=tmp_path / "out" / name,
        landmarks=maps["landmarks"],
        targets=maps["targets"],
        dedup=False,
        chunk_size=37,
        progress=False,
    )
    args.update(kw)
    preprocess(**args)
    return args["output"]


def preprocess_cli(maps, output, *args):
    geo = ("--geo", maps["path"], "--landmarks", maps["landmarks"], "--targets", maps["targets"])
    return run_dgex("preprocess", *geo, "--chunk-size", "37", *args, "--output", output)


def gene_means(maps, data: np.ndarray, ds: ProcessedDataset) -> np.ndarray:
    """Oracle: the dataset's genes (landmarks, then targets) as the mean of their probes, ``(n, L+T)``."""
    probe_col = {p: i for i, p in enumerate(maps["probes"])}
    probes_of = {r[1]: r[2].split(",") for r in maps["tg"]}
    probes_of.update({r[1]: [r[2]] for r in maps["lm"]})  # a landmark's own probe (overlap genes too)
    genes = ds.genes()
    lm = [[probe_col[p] for p in probes_of[e]] for e in genes.landmarks["ensembl"]]
    tg_map = {r[1]: r[2].split(",") for r in maps["tg"]}
    tg = [[probe_col[p] for p in tg_map[e]] for e in genes.targets["ensembl"]]
    return np.column_stack([data[:, cols].astype(np.float64).mean(axis=1) for cols in lm + tg])


def rank_map(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Oracle of the rank mapping: the sample's r-th smallest value gets reference[r]; tied values the mean of
    the reference over their ranks."""
    rows = []
    for row in values:
        ordinal = reference[rankdata(row, method="ordinal") - 1]
        rows.append(pd.Series(ordinal).groupby(row).transform("mean").to_numpy())
    return np.vstack(rows)


def own_z(values: np.ndarray, eps=1e-3) -> np.ndarray:
    return (values - values.mean(axis=0)) / (values.std(axis=0) + eps)


# ------------------------------------------------------------------ filters
def test_a_filter_keeps_exactly_the_matching_samples_and_is_part_of_the_fingerprint(tmp_path, studies):
    full = build(tmp_path, studies, "full.h5")
    two = build(tmp_path, studies, "two.h5", geo_filter={"dataset": ["alpha", "beta"]})
    with ProcessedDataset(two) as ds, ProcessedDataset(full) as ds_full:
        kept = np.concatenate([ds.ids(s) for s in ("geo-tr", "geo-va", "geo-te")])
        expected = studies["meta"].index[studies["meta"]["dataset"].isin(["alpha", "beta"])]
        assert sorted(kept) == sorted(expected)
        assert json.loads(ds.attrs["filter"]) == {"geo": {"dataset": ["alpha", "beta"]}}
        assert ds.fingerprint()["sha256"] != ds_full.fingerprint()["sha256"]
        assert "filter" not in ds_full.attrs
        # the GEO statistics are the kept samples' own (the held-out study does not leak into them)
        mean, _ = ds.stats("geo")
        in_two = studies["meta"]["dataset"].isin(["alpha", "beta"]).to_numpy()
        np.testing.assert_allclose(mean, gene_means(studies, studies["data"][in_two], ds).mean(axis=0), atol=1e-4)


def test_the_filter_is_in_the_fingerprint_even_when_it_keeps_every_sample(tmp_path, studies):
    full = build(tmp_path, studies, "full.h5")
    every = build(tmp_path, studies, "every.h5", geo_filter={"dataset": list(STUDIES)})
    with ProcessedDataset(full) as a, ProcessedDataset(every) as b:
        for split in ("geo-tr", "geo-va", "geo-te"):
            np.testing.assert_array_equal(a.X(split), b.X(split))  # the same data ...
        fa, fb = a.fingerprint(), b.fingerprint()
        assert fa["sha256"] != fb["sha256"] and fa["components"]["settings"] != fb["components"]["settings"]


def test_several_fields_must_all_match_and_the_cli_form_gives_the_same_dataset(tmp_path, studies):
    out = build(tmp_path, studies, "py.h5", geo_filter={"dataset": ["alpha"], "label": ["case"]})
    res = preprocess_cli(
        studies, tmp_path / "out" / "cli.h5", "--no-dedup", "--geo-filter", "dataset=alpha", "label=case"
    )
    assert res.returncode == 0, res.stderr
    meta = studies["meta"]
    with ProcessedDataset(out) as a, ProcessedDataset(tmp_path / "out" / "cli.h5") as b:
        kept = np.concatenate([a.ids(s) for s in ("geo-tr", "geo-va", "geo-te")])
        assert sorted(kept) == sorted(meta.index[(meta["dataset"] == "alpha") & (meta["label"] == "case")])
        assert a.fingerprint()["sha256"] == b.fingerprint()["sha256"]


@pytest.mark.parametrize(
    "flt, fragments",
    [
        (["tissue=liver"], ["filter field 'tissue'", "fields: dataset, id, label"]),
        (["dataset=delta"], ["filter dataset=delta", "values: alpha, beta, gamma"]),
        (["dataset=gamma", "label=nothing"], ["label=nothing", "values: case, control"]),
        (["dataset"], ["FIELD=VALUE"]),
    ],
)
def test_an_unknown_field_or_value_is_one_line_naming_what_exists(tmp_path, studies, flt, fragments):
    res = preprocess_cli(studies, tmp_path / "x.h5", "--geo-filter", *flt)
    if flt == ["dataset"]:  # refused by the parser: usage and one error line, exit 2
        assert res.returncode == 2 and "FIELD=VALUE" in res.stderr and "Traceback" not in res.stderr
    else:
        assert_one_line_error(res, *fragments)
    assert not (tmp_path / "x.h5").exists()


def test_a_filter_that_keeps_no_sample_is_an_error(tmp_path, studies):
    with pytest.raises(InputError, match="keeps none of its 260 samples"):
        build(tmp_path, studies, geo_filter={"dataset": ["gamma"], "id": ["S0000"]})  # S0000 is in alpha


def test_text_inputs_filter_by_sample_id_only(tmp_path, tiny_maps):
    rng = np.random.default_rng(0)
    ens = list(dict.fromkeys([r[1] for r in tiny_maps["lm"]] + [r[1] for r in tiny_maps["tg"]]))
    write_tsv(tmp_path / "r.tsv", rng.lognormal(1, 1, (20, len(ens))), ens, [f"R{i}" for i in range(20)])
    from dgex.preprocess import open_filtered

    with open_filtered(tmp_path / "r.tsv", {"id": ["R3", "R7"]}, "here") as m:
        assert list(m.col_ids) == ["R3", "R7"] and m.read().shape == (2, len(ens))
    with pytest.raises(InputError, match="text matrix has no column metadata"):
        open_filtered(tmp_path / "r.tsv", {"dataset": ["x"]}, "here")


def test_a_sparse_filter_reads_the_same_values_as_the_whole_matrix(tmp_path, studies):
    from dgex.io import open_matrix
    from dgex.preprocess import SampleSubset

    with open_matrix(studies["path"]) as m:
        pos = np.array([0, 3, 150, 151, 259])
        sub = SampleSubset(m, pos)
        sub.SPAN = 2  # several spans, some empty
        np.testing.assert_array_equal(sub.read(), studies["data"][pos])
        np.testing.assert_array_equal(sub.read(np.array([4, 1]), 1, 4), studies["data"][pos[1:4]][:, [4, 1]])
        chunks = [b for _, _, b in sub.iter_samples(2)]
        np.testing.assert_array_equal(np.vstack(chunks), studies["data"][pos])


# ------------------------------------------------------------------ test sets: protocols
@pytest.mark.parametrize("qn", [False, True])
def test_geo_statistics_on_geo_samples_reproduce_the_datasets_geo_te(tmp_path, studies, qn):
    """A probe-level test set drawn from GEO itself, with GEO's statistics, is exactly the dataset's geo-te."""
    out = build(tmp_path, studies, geo_quantile_normalize=qn, geo_filter={"dataset": ["alpha", "beta"]})
    with ProcessedDataset(out) as ds:
        te_ids, X, Y = ds.ids("geo-te"), ds.X("geo-te"), ds.Y("geo-te")
    res = prepare_test_set(
        dataset=out,
        source=studies["path"],
        output=tmp_path / "ts" / "data.h5",
        name="te",
        kind="probe",
        protocol="geo-statistics",
        filter={"id": list(te_ids)},
    )
    ts = read_test_set(res["output"])
    order = pd.Index(ts["sample_ids"]).get_indexer(te_ids)
    np.testing.assert_allclose(ts["landmarks"][order], X, atol=2e-5)
    np.testing.assert_allclose(ts["targets"][order], Y, atol=2e-5)


def test_own_statistics_rank_map_onto_the_geo_reference_then_standardise_per_gene(tmp_path, studies):
    out = build(tmp_path, studies, geo_filter={"dataset": ["alpha", "beta"]})
    prepare_test_set(
        dataset=out,
        source=studies["path"],
        output=tmp_path / "ts" / "data.h5",
        name="gamma",
        kind="probe",
        filter={"dataset": ["gamma"]},
    )
    ts = read_test_set(tmp_path / "ts" / "data.h5")
    gamma = (studies["meta"]["dataset"] == "gamma").to_numpy()
    with ProcessedDataset(out) as ds:
        values = gene_means(studies, studies["data"][gamma], ds)
        expected = own_z(rank_map(values, ds.reference()))
        fp = ds.fingerprint()["sha256"]
        L = len(ds.genes().landmarks)
    assert list(ts["sample_ids"]) == list(studies["meta"].index[gamma])
    np.testing.assert_allclose(np.hstack([ts["landmarks"], ts["targets"]]), expected, atol=2e-5)
    a = ts["attrs"]
    assert (a["name"], a["protocol"], a["kind"], a["n_samples"]) == ("gamma", "own-statistics", "probe", 40)
    assert a["dataset_fingerprint"] == fp and json.loads(a["filter"]) == {"dataset": ["gamma"]}
    assert a["source"] == str(studies["path"]) and ts["landmarks"].shape == (40, L)


def test_own_statistics_remove_a_per_gene_offset_that_geo_statistics_keep(tmp_path, studies):
    """Another lab's per-gene shift: gone after own-statistics, kept (offset / s.d.) by GEO statistics."""
    out = build(tmp_path, studies, geo_filter={"dataset": ["alpha", "beta"]})
    gamma = (studies["meta"]["dataset"] == "gamma").to_numpy()
    data = studies["data"][gamma]
    ids = list(studies["meta"].index[gamma])
    shift = np.random.default_rng(5).normal(0, 1.5, size=data.shape[1]).astype(np.float32)
    write_gctx(tmp_path / "plain.gctx", data, studies["probes"], ids)
    write_gctx(tmp_path / "shifted.gctx", data + shift, studies["probes"], ids)
    z = {}
    for protocol in ("own-statistics", "geo-statistics"):
        for which in ("plain", "shifted"):
            o = tmp_path / protocol / which / "data.h5"
            prepare_test_set(
                dataset=out, source=tmp_path / f"{which}.gctx", output=o, name=which, kind="probe", protocol=protocol
            )
            t = read_test_set(o)
            z[protocol, which] = np.hstack([t["landmarks"], t["targets"]]).astype(np.float64)
    with ProcessedDataset(out) as ds:
        _, std = ds.stats("geo")
        raw_offset = gene_means(studies, shift[None, :], ds)[0]  # the shift of each gene's probe mean
    kept = (z["geo-statistics", "shifted"] - z["geo-statistics", "plain"]).mean(axis=0)
    np.testing.assert_allclose(kept, raw_offset / (std + 1e-3), atol=1e-4)
    removed = np.abs((z["own-statistics", "shifted"] - z["own-statistics", "plain"]).mean(axis=0))
    assert removed.max() < 1e-5 and np.abs(kept).mean() > 0.5


# ------------------------------------------------------------------ gene kind, two sources
def _gene_level(tmp_path, studies, ds_path, rows, name, id_type="ensembl", genes_slice=None, order=None):
    """The samples ``rows`` at gene level (probe means) as a TSV keyed by ``id_type``; returns (path, values)."""
    with ProcessedDataset(ds_path) as ds:
        values = gene_means(studies, studies["data"][rows], ds)
        g = ds.genes()
        table = pd.concat([g.landmarks, g.targets], ignore_index=True)
    keys = table[id_type].to_numpy()
    sl = genes_slice or slice(None)
    values, keys = values[:, sl], keys[sl]
    # an overlap gene is one row (the landmark's values), read back as both landmark and target
    keys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    ids = np.asarray(studies["ids"])[rows]
    order = np.arange(len(ids)) if order is None else order
    write_tsv(tmp_path / name, values[:, first][order], keys, ids[order], id_name="gene")
    return tmp_path / name, values[:, first][:, inverse]


def test_a_gene_level_set_is_rank_mapped_like_rnaseq(tmp_path, studies):
    out = build(tmp_path, studies, geo_filter={"dataset": ["alpha", "beta"]})
    gamma = np.flatnonzero((studies["meta"]["dataset"] == "gamma").to_numpy())
    path, values = _gene_level(tmp_path, studies, out, gamma, "g.tsv", id_type="symbol")
    for protocol in ("own-statistics", "geo-statistics"):
        o = tmp_path / protocol / "data.h5"
        prepare_test_set(dataset=out, source=path, output=o, name="g", kind="gene", id_type="symbol", protocol=protocol)
        ts = read_test_set(o)
        with ProcessedDataset(out) as ds:
            mapped = rank_map(values, ds.reference())
            mean, std = ds.stats("geo")
        expected = own_z(mapped) if protocol == "own-statistics" else (mapped - mean) / (std + 1e-3)
        np.testing.assert_allclose(np.hstack([ts["landmarks"], ts["targets"]]), expected, atol=2e-5)


def test_two_sources_are_paired_by_sample_id(tmp_path, studies):
    """Targets from a second file in another order with extra samples: the same result as in landmark order."""
    out = build(tmp_path, studies, geo_filter={"dataset": ["alpha", "beta"]})
    with ProcessedDataset(out) as ds:
        L = len(ds.genes().landmarks)
    gamma = np.flatnonzero((studies["meta"]["dataset"] == "gamma").to_numpy())
    lm_path, _ = _gene_level(tmp_path, studies, out, gamma, "lm.tsv", genes_slice=slice(0, L))
    same, _ = _gene_level(tmp_path, studies, out, gamma, "tg_same.tsv", genes_slice=slice(L, None))
    rows = np.concatenate([gamma, [0, 1, 2]])  # three samples without landmarks
    perm = np.random.default_rng(1).permutation(len(rows))
    other, _ = _gene_level(tmp_path, studies, out, rows, "tg_perm.tsv", genes_slice=slice(L, None), order=perm)
    results = []
    for tg in (same, other):
        o = tmp_path / tg.stem / "data.h5"
        prepare_test_set(dataset=out, source=lm_path, targets_source=tg, output=o, name="pair", kind="gene")
        results.append(read_test_set(o))
    a, b = results
    assert list(a["sample_ids"]) == list(b["sample_ids"]) == list(np.asarray(studies["ids"])[gamma])
    np.testing.assert_allclose(a["targets"], b["targets"], atol=1e-6)
    np.testing.assert_allclose(a["landmarks"], b["landmarks"], atol=1e-6)
    assert a["attrs"]["targets_source"] == str(same)


# ------------------------------------------------------------------ errors
@pytest.fixture
def small(tmp_path, studies):
    out = build(tmp_path, studies, geo_filter={"dataset": ["alpha", "beta"]})
    gamma = np.flatnonzero((studies["meta"]["dataset"] == "gamma").to_numpy())
    return out, gamma


def _prepare(tmp_path, *args):
    return run_dgex("prepare-test-set", "--name", "x", "--output", tmp_path / "ts" / "data.h5", *args)


def test_unpaired_sample_ids_are_one_error_line(tmp_path, studies, small):
    out, gamma = small
    with ProcessedDataset(out) as ds:
        L = len(ds.genes().landmarks)
    lm, _ = _gene_level(tmp_path, studies, out, gamma, "lm.tsv", genes_slice=slice(0, L))
    tg, _ = _gene_level(tmp_path, studies, out, gamma[3:], "tg.tsv", genes_slice=slice(L, None))
    res = _prepare(tmp_path, "--dataset", out, "--source", lm, "--targets-source", tg)
    assert_one_line_error(res, "3 of 40 test-set samples have no targets", "paired by sample id")
    assert not (tmp_path / "ts" / "data.h5").exists()


def test_uncovered_genes_nan_and_wrong_ids_are_one_error_line(tmp_path, studies, small):
    out, gamma = small
    path, values = _gene_level(tmp_path, studies, out, gamma, "g.tsv")
    table = pd.read_csv(path, sep="\t")
    table.iloc[:2].to_csv(tmp_path / "few.tsv", sep="\t", index=False)  # two genes only
    res = _prepare(tmp_path, "--dataset", out, "--source", tmp_path / "few.tsv")
    assert_one_line_error(res, "genes missing")
    res = _prepare(tmp_path, "--dataset", out, "--source", path, "--id-type", "symbol")
    assert_one_line_error(res, "genes missing", "id type")
    table.iloc[3, 2] = np.nan
    table.to_csv(tmp_path / "nan.tsv", sep="\t", index=False)
    res = _prepare(tmp_path, "--dataset", out, "--source", tmp_path / "nan.tsv")
    assert_one_line_error(res, "nan.tsv")
    res = _prepare(tmp_path, "--dataset", out, "--source", studies["path"], "--kind", "probe", "--filter", "dataset=x")
    assert_one_line_error(res, "filter dataset=x", "values: alpha, beta, gamma")
    probes = studies["probes"][3:]  # a landmark probe gone
    write_gctx(tmp_path / "p.gctx", studies["data"][gamma][:, 3:], probes, np.asarray(studies["ids"])[gamma])
    res = _prepare(tmp_path, "--dataset", out, "--source", tmp_path / "p.gctx", "--kind", "probe")
    assert_one_line_error(res, "probes the gene maps use are missing", "lm0_at")
    assert not (tmp_path / "ts" / "data.h5").exists()


# ------------------------------------------------------------------ the workflow's side
def test_config_filters_and_test_sets_reach_the_jobs(tmp_path, studies):
    """A dry run: filters become --<input>-filter flags, each test set a prepare_test_set job whose downloads
    (landmarks and targets) are acquired with their checksums."""
    sha = "ab" * 32
    cfg = {
        "name": "cross",
        "results_dir": str(tmp_path / "results"),
        "resources_dir": str(tmp_path / "resources"),
        "inputs": {"geo": {"source": "path", "path": str(studies["path"]), "filter": {"dataset": ["alpha", "beta"]}}},
        "test_sets": [
            {"name": "gamma", "source": "path", "path": str(studies["path"]), "kind": "probe"},
            {
                "name": "remote.v1",
                "source": "url",
                "url": "https://example.org/lm.gctx.gz",
                "sha256": sha,
                "id_type": "entrez",
                "protocol": "geo-statistics",
                "filter": {"tissue": ["blood", "liver"]},
                "targets": {"source": "url", "url": "https://example.org/tg.tsv", "id_type": "entrez"},
            },
        ],
    }
    cfg["test_sets"][0]["filter"] = {"dataset": ["gamma"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--configfile", path],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout
    assert "--geo-filter dataset=alpha,beta" in text
    assert "--name gamma --kind probe --protocol own-statistics" in text and "--filter dataset=gamma" in text
    assert "--name remote.v1 --kind gene --protocol geo-statistics --id-type entrez" in text
    assert "--filter tissue=blood,liver" in text and "--targets-id-type entrez" in text
    assert f"--url https://example.org/lm.gctx.gz --output {tmp_path}/resources/download/test-remote.v1/" in text
    assert f"--sha256 {sha}" in text and "tg.tsv" in text
    assert "unpacked/test-remote.v1/lm.gctx" in text  # a compressed GCTX is unpacked like an input's
    assert str(tmp_path / "results" / "cross" / "test_sets" / "gamma" / "data.h5") in text


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"inputs": {"geo": {"filter": {"dataset": []}}}}, "[] should be non-empty"),
        (
            {"test_sets": [{"name": "a", "source": "path", "path": "x", "protocol": "mine"}]},
            "'mine' is not one of ['own-statistics', 'geo-statistics']",
        ),
        ({"test_sets": [{"name": "../a", "source": "path", "path": "x"}]}, "'../a' does not match"),
        (
            {"test_sets": [{"name": "a", "source": "path", "path": "x"}, {"name": "a", "source": "path", "path": "y"}]},
            "test_sets: the name a is used twice",
        ),
    ],
)
def test_bad_test_set_or_filter_config_stops_at_start(tmp_path, studies, bad, message):
    cfg = {
        "name": "c",
        "results_dir": str(tmp_path),
        "inputs": {"geo": {"source": "path", "path": str(studies["path"])}},
    }
    for key, value in bad.items():
        if key == "inputs":
            cfg["inputs"]["geo"].update(value["geo"])
        else:
            cfg[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", path], cwd=REPO, capture_output=True, text=True
    )
    assert res.returncode != 0 and message in res.stdout + res.stderr, (res.stdout + res.stderr)[-2000:]


def test_written_sample_ids_are_utf8_strings(tmp_path, studies, small):
    out, gamma = small
    o = tmp_path / "ts" / "data.h5"
    prepare_test_set(dataset=out, source=studies["path"], output=o, name="g", kind="probe", filter=["dataset=gamma"])
    with h5py.File(o, "r") as h5:
        assert h5["sample_ids"].dtype == h5py.string_dtype("utf-8") or h5py.check_string_dtype(h5["sample_ids"].dtype)
        assert h5["landmarks"].dtype == np.float32 and h5["targets"].dtype == np.float32
        assert h5.attrs["n_samples"] == len(gamma) == h5["targets"].shape[0]
