"""Stage ``prepare-test-set``: an extra data set with landmarks *and* targets, brought to a model's genes and scale.

A test set is read like the dataset's inputs: ``kind="probe"`` is HG-U133A probe level like GEO (quantile
normalised onto the GEO probe reference when the dataset's GEO input was, then probes -> gene means with the
dataset's gene maps); ``kind="gene"`` is gene level with an ``id_type`` like the RNA-seq inputs.  Landmarks
and targets come from one matrix, or from two (``targets_source``) paired by sample id, as in CMap's
GSE92743 (L1000 landmarks, RNA-seq targets of the same GTEx samples).

Protocols (how values reach the model's standardised space):

``own-statistics`` (default; the paper's cross-platform protocol, as preprocess applies it to GTEx)
    rank-map each sample onto the dataset's GEO gene reference, then standardise each gene with the test
    set's own mean and s.d.  A per-gene offset between the test set's lab and GEO is removed.
``geo-statistics``
    standardise with GEO's statistics (``stats/geo``), after rank-mapping gene-level sets onto the GEO
    reference; probe-level sets are on GEO's scale already (probe quantile normalisation), so a test set
    drawn from GEO itself reproduces the dataset's ``geo-te`` values exactly.  Offsets are kept.

The output (``test_sets/<name>/data.h5``, docs/outputs.md) holds ``landmarks`` ``(n_samples, L)`` and
``targets`` ``(n_samples, T)`` float32 in the dataset's gene order, and ``sample_ids``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .dataset import ProcessedDataset
from .errors import ConfigError, InputError
from .genes import aggregation_matrix
from .io import atomic_h5, check_finite, check_output_path, check_scale, refuse_overwriting_inputs
from .preprocess import (
    filter_args,
    load_genes,
    open_filtered,
    parse_filter,
    quantile_map,
    rnaseq_gene_matrix,
    standardise,
)
from .settings import TestSetSettings

log = logging.getLogger(__name__)

PROTOCOLS = ("own-statistics", "geo-statistics")
KINDS = ("probe", "gene")
#: Version of the data.h5 layout.
TEST_SET_FORMAT = 1


def sub_reference(reference: np.ndarray, k: int) -> np.ndarray:
    """The sorted GEO reference ``(G,)`` resampled at ``k`` evenly spaced quantiles (itself when ``k == G``).

    A source that holds only some of the genes (landmarks or targets of a two-source set) is rank-mapped onto
    the reference distribution at its own size.
    """
    g = len(reference)
    if k == g:
        return reference
    return np.interp((np.arange(k) + 0.5) / k, (np.arange(g) + 0.5) / g, reference)


def own_statistics(values: np.ndarray, epsilon: float) -> np.ndarray:
    """``values`` ``(n_samples, n_genes)`` standardised per gene with their own mean and s.d."""
    return standardise(values, values.mean(axis=0), values.std(axis=0), epsilon)


class _Source:
    """One matrix of a test set: gene-level values ``(n_samples, n_genes)`` of the genes asked for."""

    def __init__(self, path, kind, id_type, filt, where):
        self.path, self.kind, self.id_type = Path(path), kind, id_type
        self.matrix = open_filtered(path, filt, where)

    def gene_values(self, genes: pd.DataFrame, probe_ref: np.ndarray | None, probe_ids) -> np.ndarray:
        if self.kind == "gene":
            return rnaseq_gene_matrix(self.matrix, genes, self.id_type)
        # probe level: every probe the reference covers (quantile normalisation), else the mapped ones
        needed = pd.Index(genes["probes"].explode().unique())
        rows = pd.Index(probe_ids) if probe_ref is not None else needed
        pos = pd.Index(self.matrix.row_ids).get_indexer(rows)
        if (pos < 0).any():
            missing = rows[pos < 0]
            what = "probes of the GEO quantile reference" if probe_ref is not None else "probes the gene maps use"
            raise InputError(
                f"{self.path}: {len(missing)} of {len(rows)} {what} are missing (e.g. {', '.join(missing[:6])}); "
                f"a probe-level test set must be an HG-U133A matrix like the GEO input (or use kind: gene)"
            )
        block = self.matrix.read(pos).astype(np.float64)
        check_finite(block, self.matrix.col_ids, self.path)
        check_scale(
            block,
            self.path,
            linear_fix="log2-transform them first (the test set must be on the GEO input's log2 scale)",
            ratio_fix="use the un-standardised expression matrix",
        )
        if probe_ref is not None:
            block = quantile_map(block, probe_ref)
        return np.asarray(block @ aggregation_matrix(genes, list(rows)), dtype=np.float64)

    def close(self):
        self.matrix.close()


def _gene_maps(ds: ProcessedDataset) -> pd.DataFrame:
    """The dataset's landmarks then targets with their probes, rebuilt from the maps it was preprocessed with."""
    p = ds.params
    try:
        lm, tg = load_genes(
            p["landmarks"], p["targets"], p["max_targets"], p["target_seed"], p["target_parts"], p["part_seed"]
        )
    except KeyError as exc:
        raise InputError(
            f"{ds.path}: the dataset does not record its gene maps ({exc} missing from its params), so probe-level "
            f"test sets cannot be mapped to its genes; rerun `dgex preprocess` or use kind: gene"
        ) from None
    genes = ds.genes()
    if list(lm["ensembl"]) != list(genes.landmarks["ensembl"]) or list(tg["ensembl"]) != list(genes.targets["ensembl"]):
        raise InputError(
            f"{ds.path}: its gene maps ({p['landmarks']}, {p['targets']}) no longer give its genes; restore "
            f"those map files or rerun `dgex preprocess`"
        )
    return pd.concat([lm, tg], ignore_index=True)


def _pair(ids: np.ndarray, other: _Source) -> np.ndarray:
    """Positions in ``other`` of the sample ids ``ids``; one error when some are not there."""
    pos = pd.Index(other.matrix.col_ids).get_indexer(pd.Index(ids))
    if (pos < 0).any():
        missing = ids[pos < 0]
        raise InputError(
            f"{other.path}: {len(missing)} of {len(ids)} test-set samples have no targets here (e.g. "
            f"{', '.join(map(str, missing[:5]))}): landmarks and targets are paired by sample id; use files of the "
            f"same samples or filter the landmarks source to those the targets source has"
        )
    extra = other.matrix.n_cols - len(ids)
    if extra:
        log.info("%s: %d samples without landmarks are left out", other.path, extra)
    return pos


def prepare_test_set(
    *,
    dataset,
    source,
    output,
    name,
    targets_source=None,
    source_label=None,
    kind="gene",
    id_type="ensembl",
    targets_id_type=None,
    protocol="own-statistics",
    filter=None,  # noqa: A002 (the config key's name)
) -> dict:
    """Write the prepared test set ``output`` (``test_sets/<name>/data.h5``); returns its summary."""
    filt = parse_filter(filter)
    TestSetSettings.check({**locals(), "filter": filter_args(filt)})
    output = Path(output)
    if not output.name.lower().endswith((".h5", ".hdf5")):
        raise ConfigError(f"{output}: a prepared test set is an HDF5 file; name it data.h5")
    check_output_path(output)
    refuse_overwriting_inputs([output], {"--dataset": dataset, "--source": source, "--targets-source": targets_source})
    with ProcessedDataset(dataset) as ds:
        genes = ds.genes()
        L, T = len(genes.landmarks), len(genes.targets)
        epsilon = float(ds.attrs["epsilon"])
        reference = ds.reference()
        geo_mean, geo_std = ds.stats("geo")
        fingerprint = ds.fingerprint()["sha256"]
        probe_ref = probe_ids = None
        if kind == "probe":
            table = _gene_maps(ds)
            if ds.has_reference("probe_quantiles"):
                probe_ref = ds.reference("probe_quantiles")
                probe_ids = ds.reference("probe_ids").astype(str)
        else:
            table = pd.concat([genes.landmarks, genes.targets], ignore_index=True)

    where = f"test set {name}: filter / --filter"
    parts = []  # (values (n, genes), the genes' columns in L+T)
    lm_src = _Source(source, kind, id_type, filt, where)
    try:
        ids = np.asarray(lm_src.matrix.col_ids, dtype=object)
        if targets_source is None:
            parts.append((lm_src.gene_values(table, probe_ref, probe_ids), slice(0, L + T)))
        else:
            parts.append((lm_src.gene_values(table.iloc[:L], probe_ref, probe_ids), slice(0, L)))
            tg_src = _Source(targets_source, kind, targets_id_type or id_type, {}, where)
            try:
                tg_src.matrix = _Reordered(tg_src.matrix, _pair(ids, tg_src))
                parts.append((tg_src.gene_values(table.iloc[L:], probe_ref, probe_ids), slice(L, L + T)))
            finally:
                tg_src.close()
    finally:
        lm_src.close()
    n = len(ids)
    if protocol == "own-statistics" and n < 2:
        raise InputError(
            f"{source}: test set {name} has {n} sample; own-statistics needs at least 2 (or a wider filter)"
        )

    z = np.empty((n, L + T), dtype=np.float32)
    for values, cols in parts:
        # probe-level sets under GEO statistics are on GEO's scale already; the rest is rank-mapped onto GEO's
        if protocol == "own-statistics" or kind == "gene":
            values = quantile_map(values, sub_reference(reference, values.shape[1]))
        if protocol == "own-statistics":
            z[:, cols] = own_statistics(values, epsilon)
        else:
            z[:, cols] = standardise(values, geo_mean[cols], geo_std[cols], epsilon)

    attrs = {
        "format": TEST_SET_FORMAT,
        "name": name,
        "protocol": protocol,
        "kind": kind,
        "source": str(source_label or source),
        "targets_source": str(targets_source or ""),
        "filter": json.dumps(filt, sort_keys=True),
        "dataset_fingerprint": fingerprint,
        "n_samples": n,
    }
    with atomic_h5(output) as out:
        out.create_dataset("landmarks", data=z[:, :L])
        out.create_dataset("targets", data=z[:, L:])
        out.create_dataset("sample_ids", data=[str(i) for i in ids], dtype=h5py.string_dtype("utf-8"))
        for key, value in attrs.items():
            out.attrs[key] = value
    log.info("wrote %s: test set %s, %d samples, %s", output, name, n, protocol)
    return {"output": str(output), **attrs}


class _Reordered:
    """The columns ``positions`` (any order) of an open matrix: a test set's targets in its landmarks' order."""

    def __init__(self, base, positions):
        self.base, self.positions = base, positions
        self.path, self.row_ids = base.path, base.row_ids
        self.col_ids = base.col_ids[positions]

    def read(self, rows=None):
        return self.base.read(rows)[self.positions]

    def close(self):
        self.base.close()


def read_test_set(path) -> dict:
    """A prepared test set: ``{"landmarks", "targets", "sample_ids", "attrs"}`` (for tests and scoring)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: prepared test set not found; run `dgex prepare-test-set` first")
    try:
        with h5py.File(path, "r") as h5:
            return {
                "landmarks": h5["landmarks"][()],
                "targets": h5["targets"][()],
                "sample_ids": np.array([v.decode() if isinstance(v, bytes) else v for v in h5["sample_ids"][()]]),
                "attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()},
            }
    except (OSError, KeyError) as exc:
        raise InputError(f"{path}: damaged prepared test set ({exc}); rerun `dgex prepare-test-set`") from None
