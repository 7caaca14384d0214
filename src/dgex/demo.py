"""Stage ``demo``: seeded synthetic inputs shaped like the real GEO, 1000G and GTEx files.

The real pipeline runs on these files end to end in minutes on 2 CPU cores.  They
are produced by one generative model of gene expression, so that the paper's
claims can show up in the demo: a neural net beats linear regression, and
cross-platform inference (microarray -> RNA-seq) is harder than within GEO.

Generative model
----------------
One ``seed`` is split (``SeedSequence.spawn``) into independent streams for the
model parameters, the file layout and each data set, so the output is
deterministic, and the model covers the full gene maps: a gene's parameters do
not depend on ``max_targets`` or on the sample counts.

Latent state.  Each profile has latent factors ``z`` in R^K (``n_latent``),
drawn from a mixture of 8 "tissue" clusters: ``z = c_k + 0.5 * eps`` with
centres ``c_k ~ N(0, I)``.  GEO mixes all clusters (Dirichlet weights); 1000G
uses one cluster (lymphoblastoid-like, spread 0.4); GTEx uses six
tissues, three GEO clusters and three centres shifted from GEO ones
(``c_k + N(0, 0.35^2)``).  ``zs`` is ``z`` standardised with statistics of a
fixed reference draw from the GEO mixture.

Gene level (log2 scale).  Per gene a mean ``mu ~ U(5, 11.5)`` and a signal
scale ``s ~ logU(0.5, 2)``; ``noise`` is the gene-level noise s.d. (0.25).

* landmark (and unrelated "extra") gene g, linear in ``z``::

      y_g = mu_g + s_g * a_g . zs + noise * e,        |a_g| = 1

* target gene t (not a landmark)::

      y_t = mu_t + s_t * ( sqrt(1 - r_t) * b_t . zs
                           + sqrt(r_t * (1 - p_t)) * c_t . h(zs)
                           + sqrt(r_t * p_t) * q_t(zs) ) + noise * e

  with ``h_m = std(tanh(g_m * w_m . zs + beta_m))``, a bank of 32 shared
  tanh units (unit directions ``w_m``, gains ``g_m ~ U(1.5, 3)``, offsets
  ``beta_m ~ N(0, 0.75^2)``), ``c_t`` a unit vector on 3 of them, ``q_t`` a
  standardised product ``zs_i * zs_j`` of one of 16 shared pairs; the
  nonlinear share ``r_t ~ U(0.35, 0.75)``, its product share ``p_t ~ U(0, 0.5)``.
  Every feature is standardised on the GEO reference draw, so the variance of a
  target is about ``s_t^2 + noise^2`` with a share ``r_t`` that is nonlinear.
* A target whose Ensembl id is also a landmark (445 in the full maps) *is* the
  landmark gene: it has one gene-level value.

GEO (probe level, like ``bgedv2_QNORM.gctx``).  Probe value = gene value of
its gene + probe offset ``N(0, 0.3^2)`` + probe noise ``N(0, 0.1^2)``,
then a soft background floor ``2 + log(1 + e^(v - 2))`` and clipping to
[0, 16].  Rows are every probe of the landmark map, of the selected
targets and 200 unused HG-U133A "filler" probes (linear genes of their own,
``mu ~ U(3, 13)``), shuffled.  ``n_duplicates`` planted near-duplicates copy
distinct profiles plus probe noise of s.d. ``min(0.005, 0.3 / sqrt(n_probes))``
(so their distance to the original is below 0.3); column metadata ``dup_of``
names the original ("" otherwise) and ``cluster`` the latent cluster.

RNA-seq (1000G, GTEx).  The same gene-level model gives ``y`` (one value per
Ensembl id); the platform maps it per gene::

    x = a_g * (y - mu_g),  a_g ~ U(0.6, 1.4)
    log2(RPKM + 1) = b_g + x + k_g * tanh(x) + lib_sample + N(0, 0.2^2)
    b_g = mu_g - 5 + N(0, 1.5^2),  k_g ~ U(-0.25, 0.25),  lib ~ N(0, 0.15^2)

then ``RPKM = max(2^v - 1, 0)`` and half of the values below 0.5 become 0.
Gene-specific offsets and the monotone nonlinearity survive rank-based
quantile mapping onto GEO, so cross-platform inference is harder.

Outputs: ``geo.gctx``, ``1000g.tsv.gz`` (GEUVADIS layout: ``TargetID``
with Ensembl versions, ``Gene_Symbol``, ``Chr``, ``Coord``, samples),
``gtex.gctx`` (gene level, versioned Ensembl ids, column metadata ``tissue``)
and ``demo.json``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .errors import ConfigError
from .genes import ALL_PROBES, data_path, probe_annotation, read_gene_map, select_targets
from .io import ensure_dir, write_gctx, write_json, write_tsv
from .settings import DemoSettings

log = logging.getLogger(__name__)

FILES = {"geo": "geo.gctx", "1000g": "1000g.tsv.gz", "gtex": "gtex.gctx", "meta": "demo.json"}

# latent structure
N_CLUSTERS = 8
CLUSTER_SPREAD = 0.5
G1000_SPREAD = 0.4
N_REFERENCE = 4096
GTEX_TISSUES = (
    "Whole Blood",
    "Lung",
    "Muscle - Skeletal",
    "Thyroid",
    "Adipose - Subcutaneous",
    "Skin - Sun Exposed (Lower leg)",
)
GTEX_SHIFT = 0.35
# gene level
MU_RANGE = (5.0, 11.5)
SCALE_RANGE = (0.5, 2.0)
N_BANK = 32
BANK_PER_TARGET = 3
N_PAIRS = 16
GAIN_RANGE = (1.5, 3.0)
BIAS_SD = 0.75
NONLINEAR_SHARE = (0.35, 0.75)
PRODUCT_SHARE = (0.0, 0.5)
# probes
N_FILLER_PROBES = 200
FILLER_MU_RANGE = (3.0, 13.0)
PROBE_OFFSET_SD = 0.3
PROBE_NOISE_SD = 0.1
DUP_NOISE_SD = 0.005
DUP_MAX_DISTANCE = 0.3
CLIP = (0.0, 16.0)
FLOOR = 2.0
# RNA-seq platform
N_EXTRA_GENES = 300
RNASEQ_SLOPE = (0.6, 1.4)
RNASEQ_SHIFT = -5.0
RNASEQ_OFFSET_SD = 1.5
RNASEQ_BEND = 0.25
RNASEQ_NOISE_SD = 0.2
RNASEQ_LIB_SD = 0.15
RNASEQ_ZERO_BELOW = 0.5
RNASEQ_ZERO_PROB = 0.5
CHROMOSOMES = np.array([str(i) for i in range(1, 23)] + ["X"], dtype=object)


def _check_args(output_dir, n_geo, n_duplicates) -> None:
    """What :class:`~dgex.settings.DemoSettings` cannot check alone: the values together, the output folder."""
    if n_duplicates > n_geo:
        raise ConfigError(
            f"demo: n_duplicates ({n_duplicates}) must not exceed n_geo ({n_geo}); "
            f"each planted duplicate copies a different profile"
        )
    if output_dir is None or str(output_dir) == "":
        raise ConfigError("demo: output_dir is required")
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise ConfigError(f"demo: output_dir {output_dir} exists and is not a directory; choose a folder")


# --------------------------------------------------------------------------- #
# the gene-level model
# --------------------------------------------------------------------------- #
@dataclass
class _Latents:
    """The tissue clusters of the latent space and the reference statistics of ``z``."""

    centres: np.ndarray  # (N_CLUSTERS, K)
    weights: np.ndarray  # (N_CLUSTERS,) GEO mixture weights
    z_mean: np.ndarray  # (K,)
    z_sd: np.ndarray  # (K,)

    def draw(self, rng, n: int, centres: np.ndarray, probs: np.ndarray, spread: float):
        """``n`` latent vectors from a mixture over ``centres``; returns ``(z, labels)``."""
        labels = rng.choice(len(centres), size=n, p=probs)
        z = centres[labels] + spread * rng.standard_normal((n, centres.shape[1]))
        return z, labels

    def standardise(self, z):
        return (z - self.z_mean) / self.z_sd


@dataclass
class _GeneModel:
    """Parameters of every modelled gene; column order = ``self.names``."""

    names: np.ndarray  # (G,) keys: Ensembl ids, or probe ids for filler "genes"
    mu: np.ndarray  # (G,)
    lin: np.ndarray  # (G, K) linear loadings on zs (already scaled)
    nonlinear: np.ndarray  # (Gn,) column index of genes with a nonlinear part
    bank_w: np.ndarray  # (N_BANK, K) tanh directions * gains
    bank_b: np.ndarray  # (N_BANK,)
    bank_mean: np.ndarray  # (N_BANK,) reference standardisation
    bank_sd: np.ndarray
    bank_coef: np.ndarray  # (Gn, N_BANK) scaled
    pairs: np.ndarray  # (N_PAIRS, 2)
    pair_mean: np.ndarray
    pair_sd: np.ndarray
    pair_coef: np.ndarray  # (Gn, N_PAIRS) scaled

    def features(self, zs):
        h = np.tanh(zs @ self.bank_w.T + self.bank_b)
        h = (h - self.bank_mean) / self.bank_sd
        q = zs[:, self.pairs[:, 0]] * zs[:, self.pairs[:, 1]]
        q = (q - self.pair_mean) / self.pair_sd
        return h, q

    def values(self, zs, rng, noise: float, columns: np.ndarray | None = None) -> np.ndarray:
        """Gene-level log2 values ``(n, len(columns))`` (float32) for standardised latents ``zs``."""
        cols = np.arange(len(self.names)) if columns is None else np.asarray(columns)
        y = (zs @ self.lin[cols].T + self.mu[cols]).astype(np.float32)
        # nonlinear genes among the requested columns
        where = pd.Index(self.nonlinear).get_indexer(cols)
        sel = np.flatnonzero(where >= 0)
        if sel.size:
            h, q = self.features(zs)
            y[:, sel] += (h @ self.bank_coef[where[sel]].T + q @ self.pair_coef[where[sel]].T).astype(np.float32)
        if noise > 0:
            y += np.float32(noise) * rng.standard_normal(y.shape, dtype=np.float32)
        return y


def _unit_rows(rng, n, k):
    u = rng.standard_normal((n, k))
    return u / np.linalg.norm(u, axis=1, keepdims=True)


def _build_latents(rng, k: int) -> _Latents:
    centres = rng.standard_normal((N_CLUSTERS, k))
    weights = rng.dirichlet(np.full(N_CLUSTERS, 3.0))
    lat = _Latents(centres, weights, np.zeros(k), np.ones(k))
    z, _ = lat.draw(rng, N_REFERENCE, centres, weights, CLUSTER_SPREAD)
    lat.z_mean, lat.z_sd = z.mean(axis=0), z.std(axis=0)
    return lat


def _build_model(rng, lat: _Latents, names, n_linear: int) -> _GeneModel:
    """Model over ``names``: the first ``n_linear`` genes are linear, the rest have nonlinear parts."""
    k = len(lat.z_mean)
    n = len(names)
    n_nl = n - n_linear
    mu = rng.uniform(*MU_RANGE, size=n)
    scale = np.exp(rng.uniform(np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1]), size=n))
    share = np.zeros(n)
    share[n_linear:] = rng.uniform(*NONLINEAR_SHARE, size=n_nl)
    prod = rng.uniform(*PRODUCT_SHARE, size=n_nl)
    lin = _unit_rows(rng, n, k) * (scale * np.sqrt(1.0 - share))[:, None]

    bank_w = _unit_rows(rng, N_BANK, k) * rng.uniform(*GAIN_RANGE, size=N_BANK)[:, None]
    bank_b = rng.normal(0.0, BIAS_SD, size=N_BANK)
    if k >= 2:
        i = rng.integers(0, k, size=N_PAIRS)
        j = (i + rng.integers(1, k, size=N_PAIRS)) % k  # j != i
        pairs = np.stack([i, j], axis=1)
    else:
        pairs = np.zeros((N_PAIRS, 2), dtype=np.int64)  # only squares exist in one dimension
    zs_ref = lat.standardise(lat.draw(rng, N_REFERENCE, lat.centres, lat.weights, CLUSTER_SPREAD)[0])
    h = np.tanh(zs_ref @ bank_w.T + bank_b)
    q = zs_ref[:, pairs[:, 0]] * zs_ref[:, pairs[:, 1]]
    model = _GeneModel(
        names=np.asarray(names, dtype=object),
        mu=mu,
        lin=lin,
        nonlinear=np.arange(n_linear, n),
        bank_w=bank_w,
        bank_b=bank_b,
        bank_mean=h.mean(axis=0),
        bank_sd=h.std(axis=0) + 1e-6,
        bank_coef=np.zeros((n_nl, N_BANK)),
        pairs=pairs,
        pair_mean=q.mean(axis=0),
        pair_sd=q.std(axis=0) + 1e-6,
        pair_coef=np.zeros((n_nl, N_PAIRS)),
    )
    # each nonlinear gene: unit combination of BANK_PER_TARGET tanh units + one product
    pick = np.argsort(rng.random((n_nl, N_BANK)), axis=1)[:, :BANK_PER_TARGET]
    coef = rng.standard_normal((n_nl, BANK_PER_TARGET))
    coef /= np.linalg.norm(coef, axis=1, keepdims=True)
    s_nl = scale[n_linear:]
    r_nl = share[n_linear:]
    rows = np.arange(n_nl)[:, None]
    model.bank_coef[rows, pick] = coef * (s_nl * np.sqrt(r_nl * (1.0 - prod)))[:, None]
    pair = rng.integers(0, N_PAIRS, size=n_nl)
    sign = rng.choice([-1.0, 1.0], size=n_nl)
    model.pair_coef[np.arange(n_nl), pair] = sign * s_nl * np.sqrt(r_nl * prod)
    return model


# --------------------------------------------------------------------------- #
# platforms
# --------------------------------------------------------------------------- #
def _rnaseq(y, gene_mu, platform, rng) -> np.ndarray:
    """Gene-level log2 values ``y`` ``(n, G)`` -> RPKM-like values (float32, >= 0, some zeros)."""
    slope, offset, bend = platform
    x = slope * (y - gene_mu)
    v = offset + x + bend * np.tanh(x)
    v += RNASEQ_LIB_SD * rng.standard_normal((y.shape[0], 1))
    v += RNASEQ_NOISE_SD * rng.standard_normal(y.shape)
    rpkm = np.maximum(np.exp2(v) - 1.0, 0.0)
    small = rpkm < RNASEQ_ZERO_BELOW
    rpkm[small & (rng.random(y.shape) < RNASEQ_ZERO_PROB)] = 0.0
    return rpkm.astype(np.float32)


def _versioned(ids, rng) -> np.ndarray:
    versions = rng.integers(1, 20, size=len(ids))
    return np.array([f"{i}.{v}" for i, v in zip(ids, versions)], dtype=object)


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def generate(
    output_dir,
    *,
    seed=0,
    n_geo=2000,
    n_duplicates=100,
    n_1000g=150,
    n_gtex=300,
    n_latent=12,
    noise=0.25,
    max_targets=None,
    target_seed=0,
    targets="builtin",
) -> dict:
    """Write ``geo.gctx``, ``1000g.tsv.gz``, ``gtex.gctx`` and ``demo.json`` into ``output_dir``.

    Deterministic for given arguments.  Returns the contents of ``demo.json``.
    See the module docstring for the generative model.  ``targets="u133a-probes"``
    (the genome-wide L1000 model's target set) writes every HG-U133A probe: the
    unused ones all become filler probes, so any probe subset preprocessing picks is there.
    """
    DemoSettings.check(locals())
    _check_args(output_dir, n_geo, n_duplicates)
    params = {
        "seed": seed,
        "n_geo": n_geo,
        "n_duplicates": n_duplicates,
        "n_1000g": n_1000g,
        "n_gtex": n_gtex,
        "n_latent": n_latent,
        "noise": float(noise),
        "max_targets": max_targets,
        "target_seed": target_seed,
        "targets": targets,
    }
    t0 = time.time()
    out = Path(output_dir)
    ensure_dir(out)
    r_model, r_layout, r_geo, r_1000g, r_gtex = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )

    # -- genes: the model covers the FULL maps, so a gene's parameters do not depend on max_targets
    # the builtin maps as load_gene_map('builtin', ...) gives them, without its (slow, unused) Entrez column
    lm = read_gene_map(data_path("map_lm.txt"))
    tg_all = read_gene_map(data_path("map_tg.txt"))
    genome_wide = targets == ALL_PROBES
    tg = tg_all if genome_wide else select_targets(tg_all, max_targets, target_seed)
    ann = probe_annotation()
    lm_ids = set(lm["ensembl"])
    tg_only_all = tg_all.loc[~tg_all["ensembl"].isin(lm_ids), "ensembl"].tolist()
    used_probes = set(lm["probes"].explode()) | set(tg_all["probes"].explode())
    filler_pool = np.array(sorted(p for p in ann.index if p not in used_probes), dtype=object)
    n_filler = len(filler_pool) if genome_wide else min(N_FILLER_PROBES, len(filler_pool))
    filler = filler_pool[np.sort(r_layout.choice(len(filler_pool), size=n_filler, replace=False))]
    extra_ids = [f"ENSG990000{i:05d}" for i in range(1, N_EXTRA_GENES + 1)]
    # column order: linear genes (landmarks, extras, fillers), then nonlinear targets
    names = list(lm["ensembl"]) + extra_ids + [f"filler:{p}" for p in filler] + tg_only_all
    n_linear = len(names) - len(tg_only_all)
    lat = _build_latents(r_model, n_latent)
    model = _build_model(r_model, lat, names, n_linear)
    filler_cols = np.arange(len(lm) + len(extra_ids), n_linear)
    model.mu[filler_cols] = r_model.uniform(*FILLER_MU_RANGE, size=len(filler_cols))
    col_of = pd.Series(np.arange(len(names)), index=pd.Index(names))

    # -- GEO probe layout: landmark probes, selected target probes, fillers; shuffled
    probe_gene = [(p, e) for e, ps in zip(lm["ensembl"], lm["probes"]) for p in ps]
    probe_gene += [(p, e) for e, ps in zip(tg["ensembl"], tg["probes"]) for p in ps]
    probe_gene += [(p, f"filler:{p}") for p in filler]
    probe_ids = np.array([p for p, _ in probe_gene], dtype=object)
    order = r_layout.permutation(len(probe_ids))
    probe_ids = probe_ids[order]
    probe_col = col_of.reindex([probe_gene[i][1] for i in order]).to_numpy()
    geo_genes, probe_to_gene = np.unique(probe_col, return_inverse=True)  # genes GEO needs
    offsets = r_layout.normal(0.0, PROBE_OFFSET_SD, size=len(probe_ids)).astype(np.float32)
    n_probes = len(probe_ids)

    # -- GEO values
    z, labels = lat.draw(r_geo, n_geo, lat.centres, lat.weights, CLUSTER_SPREAD)
    y = model.values(lat.standardise(z), r_geo, noise, geo_genes)
    geo = y[:, probe_to_gene]
    geo += offsets
    geo += np.float32(PROBE_NOISE_SD) * r_geo.standard_normal(geo.shape, dtype=np.float32)
    del y
    # scanner background: a soft floor compresses the low end (identity well above FLOOR)
    geo -= np.float32(FLOOR)
    np.logaddexp(np.float32(0.0), geo, out=geo)
    geo += np.float32(FLOOR)
    np.clip(geo, *CLIP, out=geo)
    dup_sd = min(DUP_NOISE_SD, DUP_MAX_DISTANCE / math.sqrt(n_probes))
    src = np.sort(r_geo.choice(n_geo, size=n_duplicates, replace=False))
    dups = geo[src] + np.float32(dup_sd) * r_geo.standard_normal((n_duplicates, n_probes), dtype=np.float32)
    geo = np.clip(np.vstack([geo, dups]), *CLIP)
    origin = np.concatenate([np.arange(n_geo), src])  # which distinct profile each column shows
    cols = r_layout.permutation(len(geo))
    geo, origin = geo[cols], origin[cols]
    is_dup = cols >= n_geo
    sample_ids = np.array([f"GSM_DEMO_{i:06d}" for i in range(1, len(geo) + 1)], dtype=object)
    first = pd.Series(np.arange(len(geo)))[~is_dup]
    id_of_origin = pd.Series(sample_ids[first.values], index=origin[first.values])
    dup_of = np.where(is_dup, id_of_origin.reindex(origin).to_numpy(), "")
    row_meta = pd.DataFrame(
        {"pr_gene_symbol": ann["symbol"].reindex(probe_ids).fillna("-666").to_numpy()}, index=probe_ids
    )
    col_meta = pd.DataFrame({"dup_of": dup_of, "cluster": labels[origin].astype(np.int64)}, index=sample_ids)
    write_gctx(out / FILES["geo"], geo, probe_ids, sample_ids, row_meta, col_meta)
    geo_range = (float(geo.min()), float(np.median(geo)), float(geo.max()))
    del geo, dups

    # -- RNA-seq genes: unique Ensembl ids of landmarks + selected targets + extras, shuffled
    symbols = dict(zip(tg_all["ensembl"], tg_all["symbol"])) | dict(zip(lm["ensembl"], lm["symbol"]))
    symbols |= {e: f"DEMO{i}" for i, e in enumerate(extra_ids, 1)}
    rs_ids = np.array(list(dict.fromkeys(list(lm["ensembl"]) + list(tg["ensembl"]) + extra_ids)), dtype=object)
    rs_ids = rs_ids[r_layout.permutation(len(rs_ids))]
    rs_cols = col_of.reindex(rs_ids).to_numpy()
    platform = (
        r_layout.uniform(*RNASEQ_SLOPE, size=len(rs_ids)),
        model.mu[rs_cols] + RNASEQ_SHIFT + r_layout.normal(0.0, RNASEQ_OFFSET_SD, size=len(rs_ids)),
        r_layout.uniform(-RNASEQ_BEND, RNASEQ_BEND, size=len(rs_ids)),
    )
    rs_mu = model.mu[rs_cols]

    # 1000G: one lymphoblastoid-like cluster (cluster 0), narrower than GEO
    z, _ = lat.draw(r_1000g, n_1000g, lat.centres[:1], np.ones(1), G1000_SPREAD)
    g1000 = _rnaseq(model.values(lat.standardise(z), r_1000g, noise, rs_cols), rs_mu, platform, r_1000g)
    g_ids = np.array([f"NA_DEMO_{i:04d}" for i in range(1, n_1000g + 1)], dtype=object)
    meta_1000g = pd.DataFrame(
        {
            "Gene_Symbol": [symbols[e] for e in rs_ids],
            "Chr": CHROMOSOMES[r_layout.integers(0, len(CHROMOSOMES), size=len(rs_ids))],
            "Coord": r_layout.integers(1_000_000, 200_000_000, size=len(rs_ids)),
        }
    )
    write_tsv(out / FILES["1000g"], g1000, _versioned(rs_ids, r_layout), g_ids, meta_1000g, id_name="TargetID")
    zeros_1000g = float((g1000 == 0).mean())
    del g1000

    # GTEx: six tissues, three GEO clusters and three shifted from GEO clusters
    base = r_layout.choice(N_CLUSTERS, size=len(GTEX_TISSUES), replace=False)
    centres = lat.centres[base].copy()
    half = len(GTEX_TISSUES) // 2
    centres[half:] += GTEX_SHIFT * r_layout.standard_normal((len(GTEX_TISSUES) - half, n_latent))
    z, tissue = lat.draw(r_gtex, n_gtex, centres, np.full(len(centres), 1.0 / len(centres)), CLUSTER_SPREAD)
    gtex = _rnaseq(model.values(lat.standardise(z), r_gtex, noise, rs_cols), rs_mu, platform, r_gtex)
    t_ids = np.array([f"GTEX-DEMO-{i:04d}" for i in range(1, n_gtex + 1)], dtype=object)
    gtex_rows = _versioned(rs_ids, r_layout)
    write_gctx(
        out / FILES["gtex"],
        gtex,
        gtex_rows,
        t_ids,
        pd.DataFrame({"Description": [symbols[e] for e in rs_ids]}, index=gtex_rows),
        pd.DataFrame({"tissue": np.array(GTEX_TISSUES, dtype=object)[tissue]}, index=t_ids),
    )
    zeros_gtex = float((gtex == 0).mean())
    del gtex

    n_overlap = int(tg["ensembl"].isin(lm_ids).sum())
    meta = {
        "dgex_version": __version__,
        "generator": "dgex.demo.generate",
        "params": params,
        "files": dict(FILES),
        "counts": {
            "landmark_genes": len(lm),
            "target_genes": len(tg),
            "overlap_genes": n_overlap,
            "geo_probes": n_probes,
            "geo_filler_probes": len(filler),
            "geo_genes": len(lm) + len(tg) - n_overlap,
            "geo_samples": n_geo + n_duplicates,
            "geo_distinct_samples": n_geo,
            "geo_duplicates": n_duplicates,
            "1000g_genes": len(rs_ids),
            "1000g_samples": n_1000g,
            "1000g_extra_genes": len(extra_ids),
            "gtex_genes": len(rs_ids),
            "gtex_samples": n_gtex,
        },
        "values": {
            "geo_min": geo_range[0],
            "geo_median": geo_range[1],
            "geo_max": geo_range[2],
            "1000g_zero_fraction": zeros_1000g,
            "gtex_zero_fraction": zeros_gtex,
        },
        "model": {
            "clusters": N_CLUSTERS,
            "cluster_spread": CLUSTER_SPREAD,
            "1000g_spread": G1000_SPREAD,
            "gtex_tissues": list(GTEX_TISSUES),
            "gtex_shift": GTEX_SHIFT,
            "mu_range": MU_RANGE,
            "scale_range": SCALE_RANGE,
            "tanh_units": N_BANK,
            "tanh_units_per_target": BANK_PER_TARGET,
            "product_pairs": N_PAIRS,
            "nonlinear_share": NONLINEAR_SHARE,
            "product_share": PRODUCT_SHARE,
            "probe_offset_sd": PROBE_OFFSET_SD,
            "probe_noise_sd": PROBE_NOISE_SD,
            "duplicate_noise_sd": dup_sd,
            "rnaseq_slope": RNASEQ_SLOPE,
            "rnaseq_offset_sd": RNASEQ_OFFSET_SD,
            "rnaseq_bend": RNASEQ_BEND,
            "rnaseq_noise_sd": RNASEQ_NOISE_SD,
        },
        "seconds": round(time.time() - t0, 3),
    }
    write_json(out / FILES["meta"], meta)
    log.info(
        "demo data in %s: GEO %d probes x %d samples (%d planted duplicates), 1000G %d genes x %d, "
        "GTEx %d genes x %d; %d landmarks, %d targets (%d overlap); %.1f s",
        out,
        n_probes,
        n_geo + n_duplicates,
        n_duplicates,
        len(rs_ids),
        n_1000g,
        len(rs_ids),
        n_gtex,
        len(lm),
        len(tg),
        n_overlap,
        meta["seconds"],
    )
    return meta
