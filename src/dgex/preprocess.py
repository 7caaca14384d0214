"""Stage ``preprocess``: raw GEO / 1000G / GTEx inputs -> one processed dataset.

The recipe (from the authors' reference code, GitHub uci-cbcl/D-GEX; README "Preprocessing"):

1. GEO probe level -> gene level: a gene is the mean of its HG-U133A probes
   (optionally after quantile-normalising samples that are not yet normalised).
2. De-duplicate GEO: MiniBatchKMeans (K=100) on the gene-level profiles, then
   within each cluster drop one profile of every pair closer than Euclidean 1.0.
3. RNA-seq (1000G, GTEx): each sample is mapped by rank onto the GEO reference
   distribution (the mean sorted GEO profile).
4. Standardise per gene, ``(x - mean) / (std + 1e-3)``, with each source's own
   statistics (GEO: all profiles, as in the paper, or training only).
5. Seeded splits: GEO tr/va/te; 1000G = cross-platform va; GTEx = te.
   Target genes are randomly split into parts (halves), one network each.

GEO is streamed in chunks of samples through a temporary gene-level work file,
so memory stays bounded at the paper's 129k x 22k scale.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from contextlib import ExitStack
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
from sklearn.cluster import MiniBatchKMeans
from tqdm.auto import tqdm

from . import DATASET_FORMAT, __version__
from .dataset import content_fingerprint, encode
from .errors import ConfigError, InputError
from .genes import ALL_PROBES, aggregation_matrix, assign_parts, load_gene_map, select_targets, strip_version
from .io import (
    CONSTANT_GENE_STD,
    FLAT_SAMPLE_STD,
    MAX_LOG2_VALUE,
    Matrix,
    atomic_h5,
    check_finite,
    check_output_path,
    check_scale,
    check_written,
    flat_samples,
    open_matrix,
    refuse_overwriting_inputs,
    scratch_h5,
    write_json,
)
from .settings import PreprocessSettings

log = logging.getLogger(__name__)

#: Name endings of a processed dataset (HDF5).
DATASET_SUFFIXES = (".h5", ".hdf5")


# --------------------------------------------------------------------------- #
# building blocks (pure functions on arrays)
# --------------------------------------------------------------------------- #
def quantile_map(block: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map each row of ``block`` by rank onto the sorted ``reference`` distribution.

    ``block`` is ``(n_samples, n_features)``, ``reference`` ``(n_features,)``
    (sorted ascending).  Tied values get the mean of the reference values
    over their rank range, so equal inputs stay equal (e.g. a gene that is both
    a landmark and a target in RNA-seq).  Fully vectorised.
    """
    block = np.asarray(block)
    n, g = block.shape
    if reference.shape != (g,):
        raise ValueError(f"reference has {reference.shape[0]} values, block has {g} features")
    order = np.argsort(block, axis=1, kind="stable")
    srt = np.take_along_axis(block, order, axis=1)
    pos = np.broadcast_to(np.arange(g), (n, g))
    new_group = np.ones((n, g), dtype=bool)
    new_group[:, 1:] = srt[:, 1:] != srt[:, :-1]
    # start of each tie group: running max of the positions where a group begins
    start = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1)
    # end (exclusive) of each tie group: reversed running min of the next group's starts
    ends_at = np.full((n, g), g)
    ends_at[:, :-1] = np.where(new_group[:, 1:], pos[:, 1:], g)
    end = np.minimum.accumulate(ends_at[:, ::-1], axis=1)[:, ::-1]
    csum = np.concatenate([[0.0], np.cumsum(reference, dtype=np.float64)])
    values = (csum[end] - csum[start]) / (end - start)
    out = np.empty((n, g), dtype=np.float64)
    np.put_along_axis(out, order, values, axis=1)
    return out


def find_duplicates(profiles: np.ndarray, threshold: float, block_rows: int = 1024) -> np.ndarray:
    """Drop mask ``(n,)``: profile j is dropped if an earlier profile i < j lies closer than ``threshold``.

    ``profiles`` is ``(n, n_genes)``.  Distances are computed in float64 on
    centred data, in row blocks, so memory is ``block_rows * n``.
    """
    x = np.asarray(profiles, dtype=np.float64)
    x = x - x.mean(axis=0)
    n = x.shape[0]
    sq = np.einsum("ij,ij->i", x, x)
    drop = np.zeros(n, dtype=bool)
    thr2 = float(threshold) ** 2
    for s in range(0, n, block_rows):
        e = min(n, s + block_rows)
        d2 = sq[s:e, None] + sq[None, :] - 2.0 * (x[s:e] @ x.T)
        close = d2 < thr2
        # keep only pairs (i, j) with j > i
        close &= np.arange(n)[None, :] > np.arange(s, e)[:, None]
        drop |= close.any(axis=0)
    return drop


def split_indices(n: int, va_fraction: float, te_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Seeded random GEO split of ``n`` profiles; each split's indices sorted ascending."""
    n_va, n_te = int(round(va_fraction * n)), int(round(te_fraction * n))
    if n - n_va - n_te < 1 or (va_fraction > 0 and n_va < 1) or (te_fraction > 0 and n_te < 1):
        raise InputError(
            f"{n} GEO profiles are too few for validation/test fractions {va_fraction}/{te_fraction}; "
            f"provide more profiles or change the fractions"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return {
        "geo-va": np.sort(perm[:n_va]),
        "geo-te": np.sort(perm[n_va : n_va + n_te]),
        "geo-tr": np.sort(perm[n_va + n_te :]),
    }


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray, epsilon: float) -> np.ndarray:
    """``(x - mean) / (std + epsilon)`` as float32; ``x`` is ``(n, G)``."""
    return ((x - mean) / (std + epsilon)).astype(np.float32)


def _progress(it, total, desc, enabled):
    return tqdm(it, total=total, desc=desc, unit="chunk", disable=not enabled, leave=False)


# --------------------------------------------------------------------------- #
# sample selection by column metadata
# --------------------------------------------------------------------------- #
#: The filter field every input has: the sample (column) id itself.
ID_FIELD = "id"


def parse_filter(spec) -> dict[str, list[str]]:
    """``{field: [values]}`` from a config mapping or the command line's ``FIELD=V1,V2`` texts; ``{}`` for none.

    Values are compared as text, so ``{batch: [1]}`` keeps samples whose ``batch`` reads ``1``.
    """
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for text in spec:
            field, sep, values = str(text).partition("=")
            if not sep or not field.strip() or not values.strip():
                raise ConfigError(f"filter {text!r} is not FIELD=VALUE[,VALUE...]; e.g. dataset=chowdary,nakayama")
            items.append((field.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    out: dict[str, list[str]] = {}
    for field, values in items:
        values = [values] if isinstance(values, (str, int, float)) else list(values or [])
        if not values:
            raise ConfigError(f"filter field {field!r} lists no values; give the values to keep")
        out.setdefault(str(field), [])
        out[str(field)] += [str(v) for v in values if str(v) not in out[str(field)]]
    return out


def filter_args(filt: dict[str, list[str]]) -> list[str] | None:
    """The command line's form of a parsed filter, ``["dataset=chowdary,nakayama", "label=x"]``; None for none."""
    return [f"{k}={','.join(v)}" for k, v in filt.items()] or None


def filter_text(filt: dict[str, list[str]]) -> str:
    """The filter as one line of ``FIELD=V1,V2`` words (for logs and messages)."""
    return " ".join(filter_args(filt) or [])


def filter_positions(matrix: Matrix, filt: dict[str, list[str]], where: str) -> np.ndarray:
    """Sorted column positions of ``matrix`` whose metadata pass ``filt`` (fields ANDed, values ORed).

    ``where`` names the config key / flag in the errors: an unknown field or value, or no sample kept.
    """
    meta = matrix.col_meta()
    columns = {ID_FIELD: pd.Series(matrix.col_ids, dtype=str)}
    columns.update({str(c): meta[c].astype(str).reset_index(drop=True) for c in meta.columns})
    keep = np.ones(matrix.n_cols, dtype=bool)
    for field, values in filt.items():
        if field not in columns:
            extra = "" if len(columns) > 1 else " (a text matrix has no column metadata: filter by id or use GCTX)"
            raise InputError(
                f"{matrix.path}: filter field {field!r} ({where}) is not in the column metadata; fields: "
                f"{', '.join(sorted(columns))}{extra}"
            )
        column = columns[field]
        unknown = [v for v in values if not (column == v).any()]
        if unknown:
            present = sorted(column.unique())
            shown = ", ".join(present[:12]) + (f", ... ({len(present)} values)" if len(present) > 12 else "")
            raise InputError(
                f"{matrix.path}: filter {field}={','.join(unknown)} ({where}): no sample has that {field}; "
                f"values: {shown}"
            )
        keep &= column.isin(values).to_numpy()
    if not keep.any():
        raise InputError(
            f"{matrix.path}: filter {filter_text(filt)} ({where}) keeps none of its {matrix.n_cols} samples "
            f"(every field must match); relax the filter"
        )
    return np.flatnonzero(keep)


class SampleSubset(Matrix):
    """The columns ``positions`` (sorted) of ``base``; reads stream the base in bounded sample spans."""

    SPAN = 1024  # base samples read at once: bounds memory however sparse the selection

    def __init__(self, base: Matrix, positions: np.ndarray):
        self.base, self.positions = base, np.asarray(positions, dtype=np.int64)
        self.path, self.row_ids, self.col_ids = base.path, base.row_ids, base.col_ids[self.positions]

    def read(self, rows=None, start=0, stop=None):
        """Kept samples ``start:stop`` as ``(n_samples, n_rows)`` float32 (``rows``: a subset of rows)."""
        pos = self.positions[start:stop]
        width = self.n_rows if rows is None else len(rows)
        blocks = [np.empty((0, width), dtype=np.float32)]
        for s in range(int(pos[0]) if len(pos) else 0, int(pos[-1]) + 1 if len(pos) else 0, self.SPAN):
            sel = pos[(pos >= s) & (pos < s + self.SPAN)]
            if len(sel):
                blocks.append(self.base.read(rows, s, int(sel[-1]) + 1)[sel - s])
        return np.concatenate(blocks)

    def row_meta(self):
        """Row metadata of the base matrix (rows are not filtered)."""
        return self.base.row_meta()

    def col_meta(self):
        """Column metadata of the kept samples."""
        return self.base.col_meta().iloc[self.positions]

    def close(self):
        """Close the base matrix."""
        self.base.close()


def open_filtered(path, filt: dict[str, list[str]], where: str) -> Matrix:
    """:func:`~dgex.io.open_matrix`, keeping only the samples the filter passes (all without a filter)."""
    matrix = open_matrix(path)
    if not filt:
        return matrix
    try:
        positions = filter_positions(matrix, filt, where)
    except BaseException:
        matrix.close()
        raise
    log.info("%s: filter %s keeps %d of %d samples", path, filter_text(filt), len(positions), matrix.n_cols)
    return SampleSubset(matrix, positions)


# --------------------------------------------------------------------------- #
# gene tables
# --------------------------------------------------------------------------- #
def load_genes(landmarks, targets, max_targets, target_seed, target_parts, part_seed):
    """Landmark and target tables; targets carry ``part`` and ``overlap`` and are sorted by part."""
    lm = load_gene_map(landmarks, "landmark")
    tg = load_gene_map(targets, "target")
    if str(targets) == ALL_PROBES:  # the genome-wide model predicts every probe the landmarks do not use
        tg = tg[~tg["ensembl"].isin(set(lm["probes"].explode()))].reset_index(drop=True)
    tg = select_targets(tg, max_targets, target_seed)
    tg["part"] = assign_parts(len(tg), target_parts, part_seed)
    tg = tg.sort_values("part", kind="stable").reset_index(drop=True)
    tg["overlap"] = tg["ensembl"].isin(set(lm["ensembl"]))
    return lm, tg


def _probe_positions(matrix: Matrix, lm: pd.DataFrame, tg: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    """Positions in ``matrix`` of every probe the maps use; error naming the missing ones."""
    index = pd.Index(matrix.row_ids)
    problems = []
    for role, table in (("landmark", lm), ("target", tg)):
        probes = pd.Index(table["probes"].explode().unique())
        missing = probes[index.get_indexer(probes) < 0]
        if len(missing):
            problems.append(f"{len(missing)} of {len(probes)} {role} probes (e.g. {', '.join(missing[:6])})")
    if problems:
        raise InputError(
            f"{matrix.path}: missing "
            + " and ".join(problems)
            + "; the GEO input must be an HG-U133A probe-level matrix with these probe ids as rows"
        )
    probes = list(dict.fromkeys(lm["probes"].explode().tolist() + tg["probes"].explode().tolist()))
    return index.get_indexer(probes), probes


def _entrez_ids(ids) -> np.ndarray:
    """Entrez ids as integers in text: '5720.0' -> '5720' (a TSV id column with a blank cell is read as floats)."""
    text = pd.Series(np.asarray(ids, dtype=str)).str.strip()
    return text.str.replace(r"^(\d+)\.0*$", r"\1", regex=True).to_numpy(dtype=object)


def _gene_keys(table: pd.DataFrame, id_type: str) -> np.ndarray:
    column = {"ensembl": "ensembl", "entrez": "entrez", "symbol": "symbol"}.get(id_type)
    if column is None:
        raise InputError(f"id type {id_type!r} is not supported for RNA-seq inputs; use ensembl, entrez or symbol")
    keys = table[column].astype(str).values
    return _entrez_ids(keys) if id_type == "entrez" else keys


def rnaseq_gene_matrix(matrix: Matrix, genes: pd.DataFrame, id_type: str) -> np.ndarray:
    """Gene-level RNA-seq values for ``genes`` (landmarks then targets): ``(n_samples, L+T)``."""
    if id_type == "ensembl":
        ids = strip_version(matrix.row_ids)
    elif id_type == "entrez":
        ids = _entrez_ids(matrix.row_ids)
    else:
        ids = np.asarray(matrix.row_ids, dtype=str)
    index = pd.Index(ids)
    if not index.is_unique:
        n_dup = int(index.duplicated().sum())
        log.warning("%s: %d repeated gene ids after id normalisation; using the first of each", matrix.path, n_dup)
    keys = _gene_keys(genes, id_type)
    first = pd.Series(np.arange(len(index)), index=index)
    first = first[~index.duplicated()]
    pos = first.reindex(keys).values
    missing = keys[np.isnan(pos)]
    if len(missing):
        raise InputError(
            f"{matrix.path}: {len(np.unique(missing))} of {len(np.unique(keys))} genes missing "
            f"(e.g. {', '.join(map(str, missing[:8]))}); check the id type (--*-id-type) or use a matrix "
            f"that covers all landmark and target genes"
        )
    data = matrix.read(pos.astype(np.int64)).astype(np.float64)
    check_finite(data, matrix.col_ids, matrix.path)
    return data


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def check_not_log2(block: np.ndarray, path) -> None:
    """With ``--geo-log2``: the raw values (first chunk, ``(n_samples, n_probes)``) must be linear-scale.

    Linear-scale arrays reach thousands; values all below :data:`MAX_LOG2_VALUE` are log2 already, and a
    second log2 would squeeze them into ~1.5-4 without any other sign of the mistake.
    """
    top = float(np.nanmax(block)) if block.size else 0.0
    if top <= MAX_LOG2_VALUE:
        raise InputError(
            f"{path}: values reach only {top:.4g}, so they are log2 expression already, but --geo-log2 "
            f"(log2: true for this input in the config) would take log2 again; drop that flag"
        )


class _Phases:
    """Seconds per named step (``timings`` of the summary), logged with the peak memory so far."""

    def __init__(self):
        self.t0 = self.tick = time.time()
        self.timings: dict[str, float] = {}

    def done(self, name: str) -> None:
        now = time.time()
        self.timings[name] = round(now - self.tick, 3)
        self.tick = now
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        log.debug("phase %s: %.2f s, peak RSS %.0f MB", name, self.timings[name], peak_mb)


def preprocess(
    *,
    geo,
    output,
    summary=None,
    geo_quantile_normalize=False,
    geo_log2=False,
    g1000=None,
    g1000_id_type="ensembl",
    gtex=None,
    gtex_id_type="ensembl",
    landmarks="builtin",
    targets="builtin",
    max_targets=None,
    target_seed=0,
    target_parts=2,
    part_seed=0,
    dedup=True,
    dedup_clusters=100,
    dedup_threshold=1.0,
    standardize="transductive",
    epsilon=1e-3,
    va_fraction=0.1,
    te_fraction=0.1,
    split_seed=0,
    seed=0,
    chunk_size=4096,
    memory_mb=2048,
    geo_filter=None,
    g1000_filter=None,
    gtex_filter=None,
    progress=True,
) -> dict:
    """Build the processed dataset ``output`` (HDF5, see :mod:`dgex.dataset`) and its JSON ``summary``.

    The steps, in the README's order: gene maps; GEO probes -> gene means (optionally quantile-normalised
    first) with MiniBatchKMeans clusters; de-duplication within clusters; splits; GEO statistics and
    quantile reference; RNA-seq inputs rank-mapped onto that reference; standardised splits written.
    """
    params = {k: v for k, v in locals().items() if k not in ("progress",)}
    # a filter comes as a mapping (Python, config) or FIELD=V1,V2 texts (command line): one form from here on
    filters = {s: parse_filter(params[f"{s}_filter"]) for s in ("geo", "g1000", "gtex")}
    PreprocessSettings.check({**params, **{f"{s}_filter": filter_args(f) for s, f in filters.items()}})
    # only the filters used: an unfiltered dataset records the same parameters as before filters existed
    params = {k: v for k, v in params.items() if not k.endswith("_filter")}
    params.update({f"{s}_filter": f for s, f in filters.items() if f})
    phases = _Phases()
    output = Path(output)
    summary_path = Path(summary) if summary else output.with_suffix(".json")
    _check_outputs(output, summary_path, geo, g1000, gtex, landmarks, targets)

    lm, tg = load_genes(landmarks, targets, max_targets, target_seed, target_parts, part_seed)
    genes = pd.concat([lm, tg], ignore_index=True)
    log.info(
        "genes: %d landmarks, %d targets (%d also landmarks) in %d parts",
        len(lm),
        len(tg),
        int(tg["overlap"].sum()),
        target_parts,
    )

    matrix = open_filtered(geo, filters["geo"], "inputs.geo.filter / --geo-filter")
    with ExitStack() as stack:
        stack.callback(matrix.close)
        n_geo = matrix.n_cols
        if n_geo < 3:
            raise InputError(f"{geo}: only {n_geo} GEO samples; need at least 3 (train/validation/test)")
        log.info("GEO input %s: %d probes x %d samples", geo, matrix.n_rows, n_geo)
        reader = _GeoReader(matrix, geo, geo_log2, chunk_size, progress)

        probe_reference = None
        if geo_quantile_normalize:
            probe_reference = _probe_quantile_reference(reader)
            phases.done("quantile_reference")

        work = stack.enter_context(scratch_h5(output))  # next to the output; removed however this ends
        gene_ds, flat, kmeans, k = _gene_means_and_clusters(
            reader, genes, lm, tg, probe_reference, work, dedup, dedup_clusters, seed
        )
        phases.done("gene_means_kmeans")

        keep = _deduplicate(gene_ds, flat, kmeans, dedup, dedup_threshold, memory_mb, chunk_size, progress)
        kept = np.flatnonzero(keep)
        phases.done("dedup")
        n_flat, n_removed = int(flat.sum()), int(n_geo - flat.sum() - kept.size)
        _log_removed(geo, matrix, flat, n_removed, k, dedup_threshold)

        split_rows, split_of = _split_rows(kept, n_geo, va_fraction, te_fraction, split_seed)

        stat_rows = keep if standardize == "transductive" else (split_of == 0)
        geo_mean, geo_std, gene_reference = _geo_statistics(gene_ds, keep, stat_rows, chunk_size)
        _warn_constant_genes(geo_std, lm, tg, geo, "the GEO profiles used for the statistics")
        phases.done("statistics")

        rnaseq = _map_rnaseq(
            genes,
            gene_reference,
            (("1000g", g1000, g1000_id_type, filters["g1000"]), ("gtex", gtex, gtex_id_type, filters["gtex"])),
        )
        phases.done("rnaseq")

        with atomic_h5(output) as out:
            out.attrs["format"] = DATASET_FORMAT
            out.attrs["dgex_version"] = __version__
            out.attrs["standardize"] = standardize
            out.attrs["epsilon"] = epsilon
            out.attrs["params"] = json.dumps(params, default=str)
            if any(filters.values()):  # it changes the data: part of the content fingerprint
                out.attrs["filter"] = json.dumps({s: f for s, f in filters.items() if f}, sort_keys=True)
            _write_genes(out, lm, tg)
            _write_geo_splits(
                out, gene_ds, matrix.col_ids, split_rows, split_of, geo_mean, geo_std, epsilon, len(lm), reader
            )
            _write_stats(out, "geo", geo_mean, geo_std)
            _write_rnaseq(out, rnaseq, epsilon, len(lm))
            out["reference/gene_quantiles"] = gene_reference
            if probe_reference is not None:
                out["reference/probe_quantiles"] = probe_reference
                out["reference/probe_ids"] = encode(matrix.row_ids)
            # read back once (seconds at paper size) so that train checks its checkpoint's dataset for free
            out.attrs["fingerprint"] = json.dumps(content_fingerprint(out))
        phases.done("write")

    counts = {name: int(len(rows)) for name, rows in split_rows.items()}
    counts.update({("1000g-va" if n == "1000g" else "gtex-te"): int(v[0].shape[0]) for n, v in rnaseq.items()})
    result = {
        "output": str(output),
        "dgex_version": __version__,
        "format": DATASET_FORMAT,
        "inputs": {"geo": str(geo), "1000g": g1000 and str(g1000), "gtex": gtex and str(gtex)},
        "filters": {s: f for s, f in filters.items() if f},
        "geo_profiles_in": int(n_geo),
        "duplicates_removed": n_removed,
        "flat_removed": n_flat,
        "geo_profiles_kept": int(kept.size),
        "splits": counts,
        "genes": {
            "landmarks": len(lm),
            "targets": len(tg),
            "overlap": int(tg["overlap"].sum()),
            "parts": {int(p): int(c) for p, c in tg["part"].value_counts().sort_index().items()},
        },
        "standardize": standardize,
        "seconds": round(time.time() - phases.t0, 2),
        "timings": phases.timings,
        "params": params,
    }
    write_json(summary_path, result)
    log.info("wrote %s (%s) in %.1f s", output, ", ".join(f"{k} {v}" for k, v in counts.items()), result["seconds"])
    return result


# --------------------------------------------------------------------------- #
# the steps of preprocess, in order
# --------------------------------------------------------------------------- #
def _check_outputs(output: Path, summary_path: Path, geo, g1000, gtex, landmarks, targets) -> None:
    """Output names that say what gets written, writable places, and no input overwritten."""
    if not output.name.lower().endswith(DATASET_SUFFIXES):
        raise ConfigError(
            f"{output}: a processed dataset is an HDF5 file, but the name ends in "
            f"{''.join(output.suffixes) or 'no extension'}; name it {output.stem.split('.')[0] or 'dataset'}.h5"
        )
    if not summary_path.name.lower().endswith(".json"):
        raise ConfigError(f"{summary_path}: the preprocess summary is JSON; name it .json")
    check_output_path(output)
    check_output_path(summary_path)
    refuse_overwriting_inputs(
        [output, summary_path],
        {
            "--geo": geo,
            "--g1000": g1000,
            "--gtex": gtex,
            "--landmarks": None if str(landmarks) == "builtin" else landmarks,
            "--targets": None if str(targets) in ("builtin", ALL_PROBES) else targets,
        },
    )


class _GeoReader:
    """The GEO input streamed in sample chunks ``(n_chunk, n_probes)``: log2 on request, checked finite."""

    def __init__(self, matrix, path, log2: bool, chunk_size: int, progress: bool):
        self.matrix, self.path, self.log2, self.chunk_size, self.progress = matrix, path, log2, chunk_size, progress
        self.n_chunks = -(-matrix.n_cols // chunk_size)

    def chunks(self, desc: str):
        for start, stop, block in _progress(
            self.matrix.iter_samples(self.chunk_size), self.n_chunks, desc, self.progress
        ):
            if self.log2:
                if start == 0:
                    check_not_log2(block, self.path)
                block = np.log2(np.maximum(block, 0) + 1.0)
            check_finite(block, self.matrix.col_ids[start:stop], self.path)
            yield start, stop, block


def _probe_quantile_reference(reader: _GeoReader) -> np.ndarray:
    """Quantile normalisation's reference: the mean sorted profile over all probes, ``(n_probes,)``."""
    acc = np.zeros(reader.matrix.n_rows)
    for _, _, block in reader.chunks("quantile reference"):
        acc += np.sort(block, axis=1).sum(axis=0)
    return acc / reader.matrix.n_cols


def _gene_means_and_clusters(reader, genes, lm, tg, probe_reference, work, dedup, dedup_clusters, seed):
    """Pass 1: probe -> gene means of every GEO profile, and the MiniBatchKMeans clusters of de-duplication.

    The gene means go into ``work`` (dataset ``genes``, ``(n_geo, G)``).  Returns
    the work dataset, the flat (failed-array) profiles ``(n_geo,)`` bool, the
    fitted clustering and its K.
    """
    matrix, n_geo, G = reader.matrix, reader.matrix.n_cols, len(genes)
    probe_pos, probe_ids = _probe_positions(matrix, lm, tg)
    agg = aggregation_matrix(genes, probe_ids)
    gene_ds = work.create_dataset(
        "genes", shape=(n_geo, G), dtype=np.float32, chunks=(max(1, min(n_geo, (1 << 22) // (4 * G))), G)
    )
    k = min(dedup_clusters, n_geo)
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=max(1024, 3 * k), n_init=3)
    pending = []
    flat = np.zeros(n_geo, dtype=bool)  # failed arrays: no expression information, removed below
    checked_scale = False
    for start, stop, block in reader.chunks("gene means"):
        if not checked_scale:
            check_scale(
                block,
                reader.path,
                linear_fix="log2-transform them (set log2: true for this input, or pass --geo-log2)",
                ratio_fix="use the un-standardised expression matrix",
            )
            checked_scale = True
        if probe_reference is not None:
            block = quantile_map(block, probe_reference)
        gene_block = np.asarray(block[:, probe_pos] @ agg, dtype=np.float32)
        gene_ds[start:stop] = gene_block
        check_written(work)  # a full disk stops the run here, not after de-duplicating zeros
        flat[start:stop] = flat_samples(gene_block)
        if dedup:
            pending.append(gene_block[~flat[start:stop]] if flat[start:stop].any() else gene_block)
            if sum(len(b) for b in pending) >= k:
                kmeans.partial_fit(np.concatenate(pending))
                pending = []
    if dedup and pending and hasattr(kmeans, "cluster_centers_"):
        kmeans.partial_fit(np.concatenate(pending))
    work.flush()  # every block on disk now, so that a failed write cannot go unnoticed
    check_written(work)
    return gene_ds, flat, kmeans, k


def _deduplicate(gene_ds, flat, kmeans, dedup, threshold, memory_mb, chunk_size, progress) -> np.ndarray:
    """Pass 2: the profiles to keep, ``(n_geo,)`` bool: not flat, and not a near-copy within its cluster."""
    n_geo = gene_ds.shape[0]
    keep = ~flat
    if dedup:
        if hasattr(kmeans, "cluster_centers_"):
            labels = np.concatenate([kmeans.predict(gene_ds[s:e]) for s, e in _spans(n_geo, chunk_size)])
        else:  # fewer non-flat profiles than clusters: one cluster
            labels = np.zeros(n_geo, dtype=np.int64)
        labels[flat] = labels.max(initial=0) + 1  # a cluster of their own: never a duplicate of a real profile
        keep &= ~_dedup_by_cluster(gene_ds, labels, threshold, memory_mb, chunk_size, progress)
    return keep


def _log_removed(geo, matrix, flat, n_removed: int, k: int, threshold: float) -> None:
    n_flat, n_geo = int(flat.sum()), matrix.n_cols
    if n_flat:
        log.warning(
            "%s: %d of %d GEO samples are flat (s.d. across genes < %g log2 units: failed arrays?), e.g. %s; "
            "they are removed before de-duplication and splitting",
            geo,
            n_flat,
            n_geo,
            FLAT_SAMPLE_STD,
            ", ".join(map(str, matrix.col_ids[np.flatnonzero(flat)[:5]])),
        )
    log.info("de-duplication: removed %d of %d GEO profiles (K=%d, threshold %.3g)", n_removed, n_geo, k, threshold)


def _split_rows(kept: np.ndarray, n_geo: int, va_fraction, te_fraction, split_seed):
    """The kept profiles' rows of the work file per split, and each row's split (0 tr, 1 va, 2 te, -1 none)."""
    split_pos = split_indices(kept.size, va_fraction, te_fraction, split_seed)
    split_rows = {name: kept[pos] for name, pos in split_pos.items()}
    split_of = np.full(n_geo, -1)
    for i, name in enumerate(("geo-tr", "geo-va", "geo-te")):
        split_of[split_rows[name]] = i
    return split_rows, split_of


def _geo_statistics(gene_ds, keep, stat_rows, chunk_size):
    """Pass 3: per-gene mean and s.d. over ``stat_rows``, and the gene-level quantile reference.

    The reference is the mean sorted kept profile.  Each result is ``(G,)``
    float64, computed in streamed chunks.
    """
    G = gene_ds.shape[1]
    s1, s2, qsum = np.zeros(G), np.zeros(G), np.zeros(G)
    for s, e in _spans(gene_ds.shape[0], chunk_size):
        block = gene_ds[s:e].astype(np.float64)
        sel = block[stat_rows[s:e]]
        s1 += sel.sum(axis=0)
        s2 += (sel * sel).sum(axis=0)
        qsum += np.sort(block[keep[s:e]], axis=1).sum(axis=0)
    n_stat = int(stat_rows.sum())
    mean = s1 / n_stat
    std = np.sqrt(np.maximum(s2 / n_stat - mean**2, 0.0))
    return mean, std, qsum / int(keep.sum())


def _map_rnaseq(genes, gene_reference, sources) -> dict:
    """RNA-seq inputs rank-mapped onto the GEO reference: ``{name: (values (n, G), sample ids)}``."""
    rnaseq = {}
    for name, path, id_type, filt in sources:
        if not path:
            continue
        key = "g1000" if name == "1000g" else name
        with open_filtered(path, filt, f"inputs.{key}.filter / --{key}-filter") as rmat:
            values = quantile_map(rnaseq_gene_matrix(rmat, genes, id_type), gene_reference)
            rnaseq[name] = (values, rmat.col_ids)
        log.info("%s input %s: %d samples mapped onto the GEO reference", name, path, values.shape[0])
    return rnaseq


def _write_geo_splits(out, gene_ds, col_ids, split_rows, split_of, mean, std, epsilon, L, reader) -> None:
    """Pass 4: the standardised GEO profiles into ``splits/geo-{tr,va,te}/{X,Y,ids}``, streamed in order."""
    T = gene_ds.shape[1] - L
    dsets = {}
    for i, name in enumerate(("geo-tr", "geo-va", "geo-te")):
        n = len(split_rows[name])
        grp = out.create_group(f"splits/{name}")
        grp["ids"] = encode(col_ids[split_rows[name]])
        dsets[i] = (
            grp.create_dataset("X", (n, L), np.float32, chunks=_chunks(n, L)),
            grp.create_dataset("Y", (n, T), np.float32, chunks=_chunks(n, T)),
        )
    cursor = {0: 0, 1: 0, 2: 0}
    spans = _spans(gene_ds.shape[0], reader.chunk_size)
    for s, e in _progress(spans, reader.n_chunks, "write", reader.progress):
        z = standardise(gene_ds[s:e].astype(np.float64), mean, std, epsilon)
        which = split_of[s:e]
        for i in range(3):
            rows = z[which == i]
            if len(rows):
                x_ds, y_ds = dsets[i]
                x_ds[cursor[i] : cursor[i] + len(rows)] = rows[:, :L]
                y_ds[cursor[i] : cursor[i] + len(rows)] = rows[:, L:]
                cursor[i] += len(rows)


def _write_rnaseq(out, rnaseq: dict, epsilon, L) -> None:
    """The RNA-seq splits, each standardised with its own statistics (the paper's cross-platform protocol)."""
    for name, (values, ids) in rnaseq.items():
        mean, std = values.mean(axis=0), values.std(axis=0)
        z = standardise(values, mean, std, epsilon)
        grp = out.create_group("splits/1000g-va" if name == "1000g" else "splits/gtex-te")
        grp["ids"] = encode(ids)
        grp.create_dataset("X", data=z[:, :L])
        grp.create_dataset("Y", data=z[:, L:])
        _write_stats(out, name, mean, std)


def _warn_constant_genes(std: np.ndarray, lm: pd.DataFrame, tg: pd.DataFrame, source, over: str) -> None:
    """Warn (one line per role) about genes whose s.d. ``std`` ``(L+T,)`` is below :data:`CONSTANT_GENE_STD`."""
    L = len(lm)
    for role, table, sd, effect in (
        (
            "landmark",
            lm,
            std[:L],
            "they carry no information; the networks learn from the other landmarks",
        ),
        (
            "target",
            tg,
            std[L:],
            "they are trivially predicted and lower every mean error; drop them from the target map",
        ),
    ):
        const = np.flatnonzero(sd < CONSTANT_GENE_STD)
        if len(const):
            names = [s or e for s, e in zip(table["symbol"].iloc[const[:5]], table["ensembl"].iloc[const[:5]])]
            log.warning(
                "%s: %d of %d %s genes are constant over %s (e.g. %s): %s",
                source,
                len(const),
                len(table),
                role,
                over,
                ", ".join(map(str, names)),
                effect,
            )


def _spans(n: int, size: int):
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _chunks(n: int, width: int):
    return (max(1, min(n, (1 << 20) // (4 * max(1, width)) or 1)), width) if n else None


def _write_genes(out: h5py.File, lm: pd.DataFrame, tg: pd.DataFrame) -> None:
    for role, table in (("landmark", lm), ("target", tg)):
        for col in ("ensembl", "symbol", "entrez"):
            out[f"genes/{role}/{col}"] = encode(table[col].values)
    out["genes/target/part"] = tg["part"].values.astype(np.int64)
    out["genes/target/overlap"] = tg["overlap"].values.astype(bool)


def _write_stats(out: h5py.File, source: str, mean: np.ndarray, std: np.ndarray) -> None:
    out[f"stats/{source}/mean"] = mean
    out[f"stats/{source}/std"] = std


def _dedup_by_cluster(
    gene_ds, labels: np.ndarray, threshold: float, memory_mb: int, chunk_size: int, progress: bool
) -> np.ndarray:
    """Drop mask over all rows of ``gene_ds`` ``(n, G)``: duplicates found within each cluster.

    Clusters are processed in groups that fit the memory budget; each group
    is gathered with one sequential pass over the work file.
    """
    n, G = gene_ds.shape
    budget_rows = max(1, (memory_mb << 20) // (2 * 8 * G))  # float64 copy + gather buffer
    sizes = np.bincount(labels)
    groups, current, rows = [], [], 0
    for c in np.argsort(-sizes):
        if sizes[c] == 0:
            continue
        if current and rows + sizes[c] > budget_rows:
            groups.append(current)
            current, rows = [], 0
        current.append(c)
        rows += sizes[c]
    if current:
        groups.append(current)
    drop = np.zeros(n, dtype=bool)
    for group in tqdm(groups, desc="de-duplicate", unit="group", disable=not progress, leave=False):
        member = np.isin(labels, group)
        idx = np.flatnonzero(member)
        gathered = np.concatenate([gene_ds[s:e][member[s:e]] for s, e in _spans(n, chunk_size)])
        glabels = labels[idx]
        for c in group:
            sel = glabels == c
            drop[idx[sel]] = find_duplicates(gathered[sel], threshold)
    return drop
