"""Preprocessing: the recipe's building blocks, the whole stage on small files, bad input, real data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import pdist, squareform

from conftest import assert_one_line_error, make_geo, run_dgex
from dgex.dataset import ProcessedDataset
from dgex.errors import InputError
from dgex.genes import assign_parts
from dgex.io import write_gctx, write_tsv
from dgex.preprocess import find_duplicates, preprocess, quantile_map, split_indices


# ------------------------------------------------------------------ building blocks
def test_quantile_map_gives_each_sample_the_reference_distribution():
    rng = np.random.default_rng(0)
    block = rng.lognormal(size=(6, 50))
    reference = np.sort(rng.normal(8, 2, size=50))
    mapped = quantile_map(block, reference)
    np.testing.assert_allclose(np.sort(mapped, axis=1), np.broadcast_to(reference, (6, 50)))
    # ranks are preserved
    np.testing.assert_array_equal(np.argsort(mapped, axis=1), np.argsort(block, axis=1))


def test_quantile_map_averages_ties():
    reference = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    mapped = quantile_map(np.array([[0.0, 5.0, 0.0, 7.0, 0.0], [9.0, 9.0, 1.0, 2.0, 3.0]]), reference)
    np.testing.assert_allclose(mapped[0], [2.0, 4.0, 2.0, 10.0, 2.0])
    np.testing.assert_allclose(mapped[1], [7.0, 7.0, 1.0, 2.0, 3.0])


def planted_duplicates(n_distinct=40, n_dup=10, n_genes=20, seed=0):
    """Profiles with known distances: distinct ones 1.5 < d < 30 apart, each copy 0.27-0.33 from its source.

    Rows are shuffled; returns ``(x (n, n_genes), planted)`` where ``planted`` is the set of rows that come
    after their partner (the ones de-duplication must drop).
    """
    rng = np.random.default_rng(seed)
    while True:  # distinct profiles of very different spreads: their distances fill (1.5, 30)
        base = rng.normal(size=(n_distinct, n_genes)) * rng.uniform(0.3, 3.5, size=(n_distinct, 1))
        d = pdist(base)
        if d.min() > 1.5 and d.max() < 30:
            break
    src = rng.choice(n_distinct, n_dup, replace=False)
    direction = rng.normal(size=(n_dup, n_genes))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    copies = base[src] + direction * rng.uniform(0.27, 0.33, size=(n_dup, 1))
    order = rng.permutation(n_distinct + n_dup)
    x = np.vstack([base, copies])[order]
    new = np.argsort(order)  # new[k]: the shuffled position of original row k
    planted = {int(max(new[s], new[n_distinct + k])) for k, s in enumerate(src)}
    return x, planted


def brute_force_duplicates(x, threshold) -> set:
    """Rows j with an earlier row i < j closer than ``threshold`` (Euclidean), from the full distance matrix."""
    d = squareform(pdist(np.asarray(x, dtype=np.float64)))
    return {j for j in range(len(x)) if (d[:j, j] < threshold).any()}


def test_find_duplicates_follows_the_threshold():
    x, planted = planted_duplicates()
    # exactly the planted copies at the recipe's threshold 1.0
    assert set(np.flatnonzero(find_duplicates(x, threshold=1.0, block_rows=7))) == planted
    assert brute_force_duplicates(x, 1.0) == planted
    # other thresholds give other answers: none below the copies' distances, all but the first row above 30
    assert not find_duplicates(x, threshold=0.21).any()
    assert set(np.flatnonzero(find_duplicates(x, threshold=30.0))) == set(range(1, len(x)))
    # and match the brute force in between (catches a scaled threshold or squared vs plain distances)
    results = set()
    for thr in (0.21, 0.29, 0.31, 1.0, 2.5, 5.0, 12.0, 30.0):
        got = set(np.flatnonzero(find_duplicates(x, threshold=thr, block_rows=7)))
        assert got == brute_force_duplicates(x, thr), thr
        results.add(frozenset(got))
    assert len(results) >= 6  # the thresholds above really separate different answers


def test_split_indices_sizes_disjoint_and_seeded():
    s = split_indices(111009, 0.1, 0.1, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"geo-va": 11101, "geo-te": 11101, "geo-tr": 88807}
    allidx = np.concatenate(list(s.values()))
    assert len(np.unique(allidx)) == 111009
    again, other = split_indices(111009, 0.1, 0.1, seed=0), split_indices(111009, 0.1, 0.1, seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    assert not np.array_equal(s["geo-te"], other["geo-te"])


def test_assign_parts_balanced_and_seeded():
    parts = assign_parts(9520, 2, seed=0)
    assert np.bincount(parts).tolist() == [4760, 4760]
    assert np.array_equal(parts, assign_parts(9520, 2, seed=0))
    assert not np.array_equal(parts, assign_parts(9520, 2, seed=1))
    assert np.bincount(assign_parts(10, 3, 0)).tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])


# ------------------------------------------------------------------ the whole stage
def _rnaseq(tiny_maps, n, seed, path, fmt="tsv"):
    """Gene-level RPKM-like matrix over the unique genes of the tiny maps (versioned Ensembl ids)."""
    rng = np.random.default_rng(seed)
    ens = list(dict.fromkeys([r[1] for r in tiny_maps["lm"]] + [r[1] for r in tiny_maps["tg"]]))
    ids = [f"{e}.{i % 7 + 1}" for i, e in enumerate(ens)]
    data = rng.lognormal(1, 1.5, size=(n, len(ids)))
    data[:, 5] = 0.0  # ties
    samples = [f"R{seed}_{i}" for i in range(n)]
    if fmt == "tsv":
        write_tsv(path, data, ids, samples, pd.DataFrame({"Gene_Symbol": ens}), id_name="TargetID")
    else:
        write_gctx(path, data, ids, samples)
    return data, ens


def _run(tiny_maps, tmp_path, **kw):
    args = dict(
        geo=tmp_path / "geo.gctx",
        output=tmp_path / "out" / "ds.h5",
        landmarks=tiny_maps["landmarks"],
        targets=tiny_maps["targets"],
        dedup_clusters=5,
        chunk_size=37,
        progress=False,
    )
    args.update(kw)
    return preprocess(**args)


def test_preprocess_end_to_end(tmp_path, tiny_maps):
    data, probes, samples, pairs = make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=300, n_dups=15)
    _rnaseq(tiny_maps, 40, 1, tmp_path / "g1000.tsv.gz")
    _rnaseq(tiny_maps, 60, 2, tmp_path / "gtex.gctx", fmt="gctx")
    res = _run(tiny_maps, tmp_path, g1000=tmp_path / "g1000.tsv.gz", gtex=tmp_path / "gtex.gctx")
    # every planted duplicate (the later copy) is removed, nothing else
    assert res["duplicates_removed"] == 15
    summary = json.loads((tmp_path / "out" / "ds.json").read_text())
    assert summary["splits"] == {"geo-va": 30, "geo-te": 30, "geo-tr": 240, "1000g-va": 40, "gtex-te": 60}
    with ProcessedDataset(tmp_path / "out" / "ds.h5") as ds:
        kept = np.concatenate([ds.ids(s) for s in ("geo-tr", "geo-va", "geo-te")])
        assert not set(kept) & {samples[j] for _, j in pairs}
        genes = ds.genes()
        assert len(genes.landmarks) == 12 and len(genes.targets) == 30
        assert genes.targets["overlap"].sum() == 4
        assert np.all(np.diff(genes.targets["part"].values) >= 0)  # sorted by part
        # a gene's GEO value is the mean of its probes, then standardised with all-GEO statistics
        mean, std = ds.stats("geo")
        tr_ids = ds.ids("geo-tr")
        pos = pd.Index(samples).get_indexer(tr_ids)
        t7 = genes.targets.index[genes.targets["ensembl"] == tiny_maps["tg"][7][1]][0]
        cols = [probes.index(p) for p in tiny_maps["tg"][7][2].split(",")]
        raw = data[pos][:, cols].astype(np.float64).mean(axis=1)
        np.testing.assert_allclose(ds.Y("geo-tr")[:, t7], (raw - mean[12 + t7]) / (std[12 + t7] + 1e-3), atol=2e-5)
        allx = np.vstack([ds.X(s) for s in ("geo-tr", "geo-va", "geo-te")])
        np.testing.assert_allclose(allx.mean(axis=0), 0, atol=1e-4)  # transductive statistics
        # RNA-seq: each sample carries exactly the GEO reference distribution before standardisation
        ref = ds.reference()
        for split, src in (("1000g-va", "1000g"), ("gtex-te", "gtex")):
            m, s = ds.stats(src)
            z = np.hstack([ds.X(split), ds.Y(split)]).astype(np.float64)
            raw = z * (s + 1e-3) + m
            # overlap genes are identical in RNA-seq: landmark i == target i for the first 4 targets
            lm_cols = [
                genes.landmarks.index[genes.landmarks["ensembl"] == e][0]
                for e in genes.targets["ensembl"][genes.targets["overlap"]]
            ]
            np.testing.assert_allclose(
                raw[:, lm_cols], raw[:, 12 + np.flatnonzero(genes.targets["overlap"])], atol=1e-4
            )
            # sample means equal the reference mean (ties only redistribute within their range)
            np.testing.assert_allclose(raw.mean(axis=1), ref.mean(), rtol=1e-4)
        assert ds.Y("geo-te", part=1).shape[1] == (genes.targets["part"] == 1).sum()


def test_preprocess_inductive_statistics_use_training_only(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=120)
    _run(tiny_maps, tmp_path, standardize="inductive", dedup=False)
    with ProcessedDataset(tmp_path / "out" / "ds.h5") as ds:
        np.testing.assert_allclose(ds.X("geo-tr").mean(axis=0), 0, atol=1e-4)
        assert np.abs(ds.X("geo-te").mean(axis=0)).max() > 1e-3
        assert ds.attrs["standardize"] == "inductive"


def test_preprocess_is_deterministic_and_chunk_size_independent(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=150, n_dups=5)
    _run(tiny_maps, tmp_path, output=tmp_path / "a.h5", chunk_size=1000)
    _run(tiny_maps, tmp_path, output=tmp_path / "b.h5", chunk_size=16)
    with ProcessedDataset(tmp_path / "a.h5") as a, ProcessedDataset(tmp_path / "b.h5") as b:
        for s in ("geo-tr", "geo-va", "geo-te"):
            assert list(a.ids(s)) == list(b.ids(s))
            np.testing.assert_allclose(a.Y(s), b.Y(s), atol=1e-5)


def test_quantile_normalize_geo_option(tmp_path, tiny_maps):
    data, *_ = make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=80)
    _run(tiny_maps, tmp_path, geo_quantile_normalize=True, dedup=False)
    with ProcessedDataset(tmp_path / "out" / "ds.h5") as ds:
        ref = ds.reference("probe_quantiles")
        np.testing.assert_allclose(ref, np.sort(data.astype(np.float64), axis=1).mean(axis=0), rtol=1e-6)


# ------------------------------------------------------------------ bad input
def _assert_no_output(tmp_path):
    out = tmp_path / "out"
    assert not out.exists() or list(out.iterdir()) == []


def test_missing_probes_are_counted_and_named(tmp_path, tiny_maps):
    probes = [p for p in tiny_maps["probes"] if p not in ("lm3_at", "tg10_0_at")]
    make_geo(tmp_path / "geo.gctx", probes, n_samples=30)
    with pytest.raises(
        InputError,
        match=r"missing 1 of 12 landmark probes \(e.g. lm3_at\) and 1 of \d+ target probes \(e.g. tg10_0_at\)",
    ):
        _run(tiny_maps, tmp_path)
    _assert_no_output(tmp_path)


def test_nan_values_are_rejected(tmp_path, tiny_maps):
    data, probes, samples, _ = make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=50)
    data[17, 3] = np.nan
    write_gctx(tmp_path / "geo.gctx", data, probes, samples)
    with pytest.raises(InputError, match="1 sample.*NaN or Inf.*S00017"):
        _run(tiny_maps, tmp_path)
    _assert_no_output(tmp_path)


def test_linear_scale_is_rejected_and_log2_option_fixes_it(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=50, scale="linear")
    with pytest.raises(InputError, match="linear-scale.*log2"):
        _run(tiny_maps, tmp_path)
    _assert_no_output(tmp_path)
    assert _run(tiny_maps, tmp_path, geo_log2=True, dedup=False)["splits"]["geo-tr"] == 40


def test_zscores_are_rejected(tmp_path, tiny_maps):
    data, probes, samples, _ = make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=50)
    write_gctx(tmp_path / "geo.gctx", (data - data.mean(0)) / data.std(0), probes, samples)
    with pytest.raises(InputError, match="z-scores"):
        _run(tiny_maps, tmp_path)


def test_rnaseq_missing_genes_and_wrong_id_type(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=50)
    _rnaseq(tiny_maps, 10, 1, tmp_path / "g.tsv")
    with pytest.raises(InputError, match="genes missing.*id type"):
        _run(tiny_maps, tmp_path, g1000=tmp_path / "g.tsv", g1000_id_type="symbol")
    _assert_no_output(tmp_path)


def test_too_few_profiles(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=4)
    with pytest.raises(InputError, match="too few"):
        _run(tiny_maps, tmp_path, dedup=False)


def test_cli_error_is_one_line_and_nonzero(tmp_path, tiny_maps):
    (tmp_path / "geo.gctx").write_bytes(b"")
    res = run_dgex(
        "preprocess",
        "--geo",
        tmp_path / "geo.gctx",
        "--output",
        tmp_path / "out" / "ds.h5",
        "--landmarks",
        tiny_maps["landmarks"],
        "--targets",
        tiny_maps["targets"],
    )
    assert_one_line_error(res, "empty file")
    _assert_no_output(tmp_path)


def test_cli_rejects_out_of_range_values(tmp_path):
    res = run_dgex("preprocess", "--geo", "x.gctx", "--output", "y.h5", "--va-fraction", "1.5")
    assert res.returncode == 2 and "must be in [0, 1)" in res.stderr


# ------------------------------------------------------------------ real data
@pytest.mark.realdata
def test_preprocess_real_u133a_profiles(tmp_path, shared_data):
    res = preprocess(
        geo=shared_data / "u133a_dev.gctx",
        geo_quantile_normalize=True,
        output=tmp_path / "real.h5",
        dedup_clusters=10,
        progress=False,
    )
    assert res["geo_profiles_in"] == 240
    assert sum(res["splits"].values()) == res["geo_profiles_kept"] == 240 - res["duplicates_removed"]
    assert res["genes"] == {"landmarks": 943, "targets": 9520, "overlap": 445, "parts": {0: 4760, 1: 4760}}
    with ProcessedDataset(tmp_path / "real.h5") as ds:
        x = ds.X("geo-tr")
        assert x.shape == (res["splits"]["geo-tr"], 943) and np.isfinite(x).all()
        # after quantile normalisation every sample has the same probe-value distribution
        ref = ds.reference("probe_quantiles")
        assert ref.shape == (22283,) and 0 < ref[0] < ref[-1] < 17


def test_genome_wide_targets_are_every_probe_the_landmarks_do_not_use():
    from dgex.genes import ALL_PROBES, load_gene_map
    from dgex.preprocess import load_genes

    lm, tg = load_genes("builtin", ALL_PROBES, None, 0, 4, 0)
    lm_probes = set(lm["probes"].explode())
    assert len(tg) > 20000 and tg["ensembl"].is_unique
    assert not set(tg["ensembl"]) & lm_probes
    assert not tg["ensembl"].str.startswith("AFFX").any()
    assert sorted(tg["part"].unique()) == [0, 1, 2, 3]
    with pytest.raises(Exception, match="only be used for targets"):
        load_gene_map(ALL_PROBES, "landmark")
