"""Preprocessing against independent oracles: numpy statistics on the full matrix, brute-force de-duplication,
the memory-bounded cluster grouping, and RNA-seq inputs keyed by Entrez ids.

Every expected value is computed here from the input matrices (gene = mean of its probes, as the recipe
says), never copied from dgex's output.
"""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import pdist, squareform

from conftest import make_geo, run_dgex
from dgex import preprocess as pp
from dgex.dataset import ProcessedDataset
from dgex.genes import probe_annotation
from dgex.io import write_gctx, write_tsv
from dgex.preprocess import _dedup_by_cluster, preprocess

SPLITS = ("geo-tr", "geo-va", "geo-te")


def gene_matrix(data, probe_ids, genes) -> np.ndarray:
    """Gene-level GEO ``(n_samples, n_genes)``: the mean of each gene's probes; ``genes`` rows of (.., probes)."""
    col = {p: i for i, p in enumerate(probe_ids)}
    return np.stack([data[:, [col[p] for p in probes]].astype(np.float64).mean(axis=1) for probes in genes], axis=1)


def map_genes(tiny_maps) -> list[list[str]]:
    """Probes of every landmark then every target gene of the tiny maps (column order does not matter here)."""
    return [[r[2]] for r in tiny_maps["lm"]] + [r[2].split(",") for r in tiny_maps["tg"]]


def kept_ids(path) -> list[str]:
    with ProcessedDataset(path) as ds:
        return [i for s in SPLITS for i in ds.ids(s)]


def brute_force(x, threshold, labels=None) -> set:
    """Rows j with an earlier row i < j (in the same cluster) closer than ``threshold``."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.zeros(len(x), int) if labels is None else np.asarray(labels)
    drop = set()
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        d = squareform(pdist(x[idx]))
        drop |= {int(idx[j]) for j in range(len(idx)) if (d[:j, j] < threshold).any()}
    return drop


# --------------------------------------------------------------------------- streamed statistics
@pytest.mark.parametrize("standardize", ["transductive", "inductive"])
def test_streamed_gene_statistics_equal_numpy_on_the_full_matrix(tmp_path, tiny_maps, standardize):
    data, probes, samples, _ = make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=300, n_dups=15)
    out = tmp_path / "ds.h5"
    # 37-sample chunks: statistics are summed over 9 chunks, one of them partial
    preprocess(
        geo=tmp_path / "geo.gctx",
        output=out,
        landmarks=tiny_maps["landmarks"],
        targets=tiny_maps["targets"],
        standardize=standardize,
        dedup_clusters=5,
        chunk_size=37,
        progress=False,
    )
    genes = gene_matrix(data, probes, map_genes(tiny_maps))
    kept = pd.Index(samples).get_indexer(kept_ids(out))
    assert len(kept) < len(samples)  # duplicates removed: the statistics must use the kept rows only
    with ProcessedDataset(out) as ds:
        rows = kept if standardize == "transductive" else pd.Index(samples).get_indexer(ds.ids("geo-tr"))
        mean, std = ds.stats("geo")
        reference = ds.reference("gene_quantiles")
        g = ds.genes()
    # the dataset orders targets by part: reorder the oracle's columns by Ensembl id
    order = [r[1] for r in tiny_maps["lm"]] + [r[1] for r in tiny_maps["tg"]]
    lm_pos = [order.index(e) for e in g.landmarks["ensembl"]]
    tg_pos = [len(tiny_maps["lm"]) + [r[1] for r in tiny_maps["tg"]].index(e) for e in g.targets["ensembl"]]
    cols = genes[:, lm_pos + tg_pos]
    np.testing.assert_allclose(mean, cols[rows].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, np.std(cols[rows], axis=0, ddof=0), rtol=1e-5)
    # the GEO reference distribution: mean sorted gene profile over the kept profiles (always all of them)
    np.testing.assert_allclose(reference, np.sort(cols[kept], axis=1).mean(axis=0), rtol=1e-6)


# --------------------------------------------------------------------------- de-duplication in the stage
def test_preprocess_removes_exactly_the_profiles_the_threshold_says(tmp_path, tiny_maps):
    """One cluster, so the answer is the brute force over all gene-level profiles, for two thresholds."""
    data, probes, samples, _ = make_geo(tmp_path / "base.gctx", tiny_maps["probes"], n_samples=150)
    rng = np.random.default_rng(5)
    src = rng.choice(150, size=20, replace=False)
    # copies at spread distances (per-probe noise from 0.005 to 0.4): some closer, some farther than 1.0
    noise = rng.normal(size=(20, data.shape[1])) * np.geomspace(0.005, 0.4, 20)[:, None]
    data = np.vstack([data, data[src] + noise]).astype(np.float32)
    samples = samples + [f"D{k:03d}" for k in range(20)]
    write_gctx(tmp_path / "geo.gctx", data, probes, samples)
    genes = gene_matrix(data, probes, map_genes(tiny_maps))
    # a threshold between two copies' distances, read from the data: the two thresholds must disagree
    dup_d = np.sort(np.linalg.norm(genes[150:] - genes[src], axis=1))
    middle = float(dup_d[(dup_d < 1.0).sum() // 2 : (dup_d < 1.0).sum() // 2 + 2].mean())
    answers = {}
    for thr in (1.0, middle):
        out = tmp_path / f"ds_{thr:g}.h5"
        res = preprocess(
            geo=tmp_path / "geo.gctx",
            output=out,
            landmarks=tiny_maps["landmarks"],
            targets=tiny_maps["targets"],
            dedup_clusters=1,
            dedup_threshold=thr,
            chunk_size=40,
            progress=False,
        )
        removed = set(samples) - set(kept_ids(out))
        expected = {samples[j] for j in brute_force(genes, thr)}
        assert removed == expected and res["duplicates_removed"] == len(expected), thr
        answers[thr] = removed
    assert answers[middle] < answers[1.0]  # fewer copies are closer than the smaller threshold


# --------------------------------------------------------------------------- memory-bounded grouping
@pytest.mark.parametrize("threshold", [1.0, 0.3])
def test_memory_bounded_groups_equal_one_group_and_brute_force(tmp_path, monkeypatch, threshold):
    """A 1 MB budget over 2,048 genes holds 32 rows: the 15 clusters are gathered in several groups."""
    rng = np.random.default_rng(0)
    n_distinct, n_copies, G, k = 260, 40, 2048, 15
    base = rng.normal(scale=0.1, size=(n_distinct, G)) * rng.uniform(0.5, 2.0, size=(n_distinct, 1))
    src = rng.choice(n_distinct, n_copies, replace=False)
    direction = rng.normal(size=(n_copies, G))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    copies = base[src] + direction * rng.uniform(0.1, 0.5, size=(n_copies, 1))
    x = np.vstack([base, copies]).astype(np.float32)
    order = rng.permutation(len(x))
    x = x[order]
    labels = rng.choice(k, size=n_distinct, p=rng.dirichlet(np.ones(k)))
    labels = np.concatenate([labels, labels[src]])[order]  # copies share their source's cluster
    labels[rng.choice(len(x), 10, replace=False)] = 3  # ... except a few moved elsewhere (not found)
    with h5py.File(tmp_path / "work.h5", "w") as h5:
        ds = h5.create_dataset("genes", data=x, chunks=(16, G))
        groups = []

        def spy(iterable, **kw):
            groups.append(list(iterable))
            return groups[-1]

        monkeypatch.setattr(pp, "tqdm", spy)
        small = _dedup_by_cluster(ds, labels, threshold, memory_mb=1, chunk_size=37, progress=False)
        large = _dedup_by_cluster(ds, labels, threshold, memory_mb=100_000, chunk_size=37, progress=False)
        x_back = ds[:]
    budget = (1 << 20) // (16 * G)
    sizes = np.bincount(labels, minlength=k)
    assert len(groups[0]) > 3 and len(groups[1]) == 1
    assert sorted(int(c) for g in groups[0] for c in g) == sorted(np.flatnonzero(sizes).tolist())
    assert all(sizes[g].sum() <= budget or len(g) == 1 for g in groups[0])
    expected = brute_force(x_back, threshold, labels)
    assert set(np.flatnonzero(small)) == set(np.flatnonzero(large)) == expected
    assert len(expected) >= 10  # the comparison is about real duplicates, not an empty answer


# --------------------------------------------------------------------------- RNA-seq keyed by Entrez ids
@pytest.fixture
def real_probe_maps(tmp_path):
    """Gene maps over real HG-U133A probes (so genes get Entrez ids from the shipped annotation).

    10 landmarks; 14 targets: 2 also landmarks, 10 others and two genes (own Ensembl ids) measured by
    probes of one Entrez gene.
    """
    ann = probe_annotation()
    ann = ann[ann["entrez"].str.fullmatch(r"\d+") & ~ann.index.str.startswith("AFFX")]  # one gene per probe
    by_entrez = ann.reset_index().groupby("entrez")["pr_id"].apply(list)
    multi = by_entrez[by_entrez.map(len) >= 2].sort_index().iloc[:23]
    entrez = list(multi.index)
    lm = [(f"LM{i}", f"ENSG8{i:010d}", multi.iloc[i][0], entrez[i]) for i in range(10)]
    tg = [(f"LM{i}", f"ENSG8{i:010d}", multi.iloc[i][1], entrez[i]) for i in range(2)]
    tg += [(f"TG{i}", f"ENSG7{i:010d}", ",".join(multi.iloc[i][:2]), entrez[i]) for i in range(10, 20)]
    tg += [("PAIR_A", "ENSG6000000000A", multi.iloc[20][0], entrez[20])]
    tg += [("PAIR_B", "ENSG6000000000B", multi.iloc[20][1], entrez[20])]
    (tmp_path / "lm.txt").write_text("".join(f"{s}\t{e}\t{p}\n" for s, e, p, _ in lm))
    (tmp_path / "tg.txt").write_text("".join(f"{s}\t{e}\t{p}\n" for s, e, p, _ in tg))
    probes = list(dict.fromkeys(p for _, _, ps, _ in lm + tg for p in ps.split(",")))
    spare = entrez[21:]  # Entrez genes of no map: extra rows in the RNA-seq input
    return {"lm": tmp_path / "lm.txt", "tg": tmp_path / "tg.txt", "genes": lm + tg, "probes": probes, "spare": spare}


def test_gtex_with_entrez_ids_equals_the_ensembl_keyed_input(tmp_path, real_probe_maps, caplog):
    m = real_probe_maps
    make_geo(tmp_path / "geo.gctx", m["probes"], n_samples=80)
    rng = np.random.default_rng(2)
    n = 25
    samples = [f"GTEX-{i}" for i in range(n)]
    gene_entrez = {e: z for _, e, _, z in m["genes"]}  # Ensembl -> Entrez
    values = {z: rng.lognormal(1, 1.5, size=n) for z in dict.fromkeys(gene_entrez.values())}
    # Ensembl-keyed input (versioned ids): the two genes of one Entrez id carry its values
    ens = list(gene_entrez)
    write_tsv(
        tmp_path / "gtex_ens.tsv",
        np.stack([values[gene_entrez[e]] for e in ens], axis=1),
        [f"{e}.3" for e in ens],
        samples,
        id_name="gene_id",
    )
    # Entrez-keyed inputs, rows in another order, plus Entrez genes of no map.  (a) a blank id makes pandas
    # read the whole id column as floats ('5720.0'); (b) text ids (a 'LOC' id keeps the column text), some
    # written '5720.0', one gene twice ('1002' and '1002.0': the same gene after normalisation; the first is
    # used, the later row has other values) and a blank id
    ez = list(values)[::-1]
    spare = [values[ez[3]] + 5.0, *rng.lognormal(size=(3, n))]
    rows_a = ez + ["", m["spare"][0], m["spare"][1]]
    write_tsv(
        tmp_path / "gtex_a.tsv",
        np.stack([values[z] for z in ez] + spare[1:], axis=1),
        rows_a,
        samples,
        id_name="entrez",
    )
    assert pd.read_csv(tmp_path / "gtex_a.tsv", sep="\t")["entrez"].dtype == np.float64  # really '5720.0'
    rows_b = [z if i % 2 else f"{z}.0" for i, z in enumerate(ez)] + [f"{ez[3]}.0", "", "LOC1", "7"]
    write_tsv(tmp_path / "gtex_b.tsv", np.stack([values[z] for z in ez] + spare, axis=1), rows_b, samples)
    assert pd.read_csv(tmp_path / "gtex_b.tsv", sep="\t")["id"].dtype == object

    common = dict(landmarks=m["lm"], targets=m["tg"], dedup=False, chunk_size=30, progress=False)
    preprocess(geo=tmp_path / "geo.gctx", output=tmp_path / "ens.h5", gtex=tmp_path / "gtex_ens.tsv", **common)
    preprocess(
        geo=tmp_path / "geo.gctx",
        output=tmp_path / "a.h5",
        gtex=tmp_path / "gtex_a.tsv",
        gtex_id_type="entrez",
        **common,
    )
    with caplog.at_level(logging.WARNING, logger="dgex.preprocess"):
        preprocess(
            geo=tmp_path / "geo.gctx",
            output=tmp_path / "b.h5",
            gtex=tmp_path / "gtex_b.tsv",
            gtex_id_type="entrez",
            **common,
        )
    assert any("1 repeated gene ids" in r.getMessage() for r in caplog.records)
    # and through the CLI flag
    res = run_dgex(
        "preprocess",
        "--geo",
        tmp_path / "geo.gctx",
        "--gtex",
        tmp_path / "gtex_a.tsv",
        "--gtex-id-type",
        "entrez",
        "--landmarks",
        m["lm"],
        "--targets",
        m["tg"],
        "--no-dedup",
        "--no-progress",
        "--output",
        tmp_path / "cli.h5",
    )
    assert res.returncode == 0, res.stderr
    with ProcessedDataset(tmp_path / "ens.h5") as a:
        want_x, want_y, want_stats = a.X("gtex-te"), a.Y("gtex-te"), a.stats("gtex")
        assert list(a.ids("gtex-te")) == samples
        genes = a.genes()
    for path in ("a.h5", "b.h5", "cli.h5"):
        with ProcessedDataset(tmp_path / path) as b:
            np.testing.assert_array_equal(b.X("gtex-te"), want_x)
            np.testing.assert_array_equal(b.Y("gtex-te"), want_y)
            for got, want in zip(b.stats("gtex"), want_stats):
                np.testing.assert_array_equal(got, want)
    # the pair of genes of one Entrez id got identical values (and they are not constant)
    pair = [genes.targets.index[genes.targets["ensembl"] == e][0] for e in ("ENSG6000000000A", "ENSG6000000000B")]
    np.testing.assert_array_equal(want_y[:, pair[0]], want_y[:, pair[1]])
    assert want_y[:, pair[0]].std() > 0
