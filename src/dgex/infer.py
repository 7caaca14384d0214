"""Stage ``infer``: predict target-gene expression for users' landmark profiles with an exported model bundle.

Input: a genes x samples matrix (GCTX streamed in chunks of samples; GCT /
TSV / CSV read into memory) holding log2 expression of (at least half of)
the model's landmark genes.  Row ids may be Ensembl ids (version suffixes are
dropped), Entrez ids, gene symbols or L1000 / HG-U133A probe ids (e.g.
``200814_at``); ``--id-type auto`` picks the type under which the most
landmarks are found.  Rows that are not landmarks of the model (e.g. the 35
L1000 landmarks outside the D-GEX map) are ignored; several rows measuring
one landmark are averaged (D-GEX takes a gene as the mean of its probes).

Per chunk: optional rank mapping onto the GEO landmark reference, per-gene
standardisation with the GEO statistics of the bundle, one forward pass per
target-part network (eval mode, no gradients, GPU if present), and the
inverse standardisation of the targets, so predictions are on the GEO log2
expression scale.  The GCTX output is written batch by batch in a background
thread while the next batch is computed, and renamed into place only when
complete; text and AnnData (.h5ad) outputs are built in memory.

Every output follows CMap's GCTX conventions for rows: the row id is the
model's neutral gene id (Ensembl id, or the probe id for probe targets), with
``pr_gene_id`` (Entrez), ``pr_gene_symbol``, ``pr_ensembl_id``, ``pr_probe_id``,
``part``, every further per-target column of the bundle, and the flags
``pr_is_lm`` / ``pr_is_inferred`` / ``pr_is_imputed``; ``--include-landmarks``
adds the input's measured landmarks as rows.  Provenance (bundle id and
checksum, selection, model, dgex version, creation time, training data and a
warning for models trained on synthetic demo data) is in every output: GCTX
column-metadata fields ``dgex_*`` (cmapPy's and cmapR's parsers return them;
HDF5 attributes they would not show), AnnData ``uns['dgex_provenance']``, and a
JSON sidecar ``<output>.provenance.json`` beside text outputs (so the table
itself stays a plain table for any CSV reader).

When to use ``--quantile-normalize``: when the input's value distribution
differs from GEO's quantile-normalised HG-U133A log2 scale (another platform
or normalisation: RNA-seq log values, L1000 data from a different pipeline,
un-normalised arrays); each sample is then mapped by rank onto the mean
sorted GEO landmark profile, as D-GEX maps RNA-seq samples onto GEO.  Leave it
off for inputs already on the GEO scale (e.g. GEO / CMap quantile-normalised
arrays): it discards each sample's overall level.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .bundle import Bundle, load_bundle
from .bundle import well_inferred as well_inferred_flags
from .devices import pick_device
from .errors import ConfigError, InputError
from .genes import clean_entrez
from .io import (
    CONSTANT_GENE_STD,
    FLAT_SAMPLE_STD,
    GCTXWriter,
    atomic_path,
    check_finite,
    check_output_path,
    check_scale,
    flat_samples,
    open_matrix,
    refuse_overwriting_inputs,
)
from .settings import WELL_INFERRED, InferSettings

log = logging.getLogger(__name__)

ID_TYPES = ("ensembl", "entrez", "symbol", "probe")
#: Order in which id types win a tie in ``--id-type auto``.
AUTO_ORDER = ("probe", "ensembl", "entrez", "symbol")
FORMATS = ("gctx", "csv", "tsv", "h5ad")
#: Output name endings of each format (.txt is tab-separated text, as ``open_matrix`` reads it).
EXTENSIONS = {
    "gctx": (".gctx", ".h5"),
    "csv": (".csv", ".csv.gz"),
    "tsv": (".tsv", ".tsv.gz", ".txt", ".txt.gz"),
    "h5ad": (".h5ad",),
}
#: Extensions that promise some other file type: an output named so is refused even with --format.
# fmt: off
PROMISING_SUFFIXES = {
    ".gz", ".bz2", ".xz", ".zst", ".zip", ".tar", ".tgz", ".parquet", ".pq", ".feather", ".arrow", ".json",
    ".xlsx", ".xls", ".h5ad", ".hdf5", ".hdf", ".loom", ".npy", ".npz", ".pkl", ".pickle", ".gct", ".mtx",
    ".rds", ".rda", ".csv", ".tsv", ".txt",
}
# fmt: on
#: Text and AnnData outputs are built in memory: refuse more samples than this unless forced.
MAX_TEXT_SAMPLES = 20_000
#: Fewer landmarks than this fraction is always an error, imputation or not.
MIN_PRESENT_FRACTION = 0.5
#: Output bytes per predicted batch when --batch-size is not given.
BATCH_BYTES = 64 << 20


# --------------------------------------------------------------------------- #
# gene-id mapping
# --------------------------------------------------------------------------- #
@lru_cache(maxsize=1)
def probe_to_entrez() -> pd.Series:
    """Entrez id of every L1000 landmark probe and HG-U133A probe (index: probe id)."""
    from .genes import data_path, probe_annotation

    l1000 = pd.read_csv(data_path("l1000_landmarks.tsv"), sep="\t", dtype=str).set_index("pr_id")["pr_gene_id"]
    u133a = probe_annotation()["entrez"]
    both = pd.concat([l1000, u133a[~u133a.index.isin(l1000.index)]])
    both = both[(both != "-666") & both.notna()]
    return both.map(clean_entrez)


def _lookup(keys, table) -> np.ndarray:
    """Position in ``table`` of each key (-1 if absent); empty and repeated table entries never match twice."""
    table = pd.Series(np.asarray(table, dtype=object))
    ok = (table != "") & ~table.duplicated()
    index = pd.Series(np.flatnonzero(ok.values), index=pd.Index(table[ok].values))
    return index.reindex(pd.Index(np.asarray(keys, dtype=object))).fillna(-1).to_numpy(dtype=np.int64)


def landmark_of(bundle: Bundle, ids, id_type: str) -> np.ndarray:
    """For each input id, the index of the model landmark it measures (``-1``: none); ``(n_ids,)``."""
    from .genes import strip_version

    ids = np.array([str(i).strip() for i in ids], dtype=object)
    lm = bundle.landmarks
    if id_type == "ensembl":
        return _lookup([s.upper() for s in strip_version(ids)], lm["ensembl"].str.upper())
    if id_type == "entrez":
        return _lookup([clean_entrez(i) for i in ids], lm["entrez"])
    if id_type == "symbol":
        return _lookup([s.upper() for s in ids], lm["symbol"].str.upper())
    if id_type == "probe":
        idx = _lookup(ids, lm["probe"])
        if len(np.unique(idx[idx >= 0])) == len(lm):
            return idx
        # probes the bundle does not name (custom maps, other probes of a gene): through their Entrez id
        entrez = probe_to_entrez().reindex(pd.Index(ids)).fillna("").to_numpy(dtype=object)
        via = _lookup(entrez, lm["entrez"])
        use = (idx < 0) & (via >= 0) & ~np.isin(via, idx[idx >= 0])
        idx[use] = via[use]
        return idx
    raise ConfigError(f"--id-type must be auto or one of {', '.join(ID_TYPES)} (got {id_type!r})")


@dataclass
class LandmarkMapping:
    """Which input rows feed which landmarks.

    ``present`` ``(k,)``: landmark indices found, ascending; ``rows`` ``(m,)``
    and ``landmark`` ``(m,)``: input rows used and the landmark each measures;
    ``weights`` ``(m, k)`` (sparse) averages rows measuring the same landmark,
    ``None`` when each landmark has exactly one row.
    """

    id_type: str
    present: np.ndarray
    rows: np.ndarray
    landmark: np.ndarray
    weights: object
    n_landmarks: int

    @property
    def missing(self) -> np.ndarray:
        """Positions of the model's landmarks that the input lacks, ``(n_missing,)``."""
        return np.setdiff1d(np.arange(self.n_landmarks), self.present)

    def gather(self, block: np.ndarray) -> np.ndarray:
        """Present landmarks ``(n, k)`` in ``present`` order from an input block ``(n, n_rows)``."""
        if self.weights is None:
            return np.take(block, self.rows, axis=1)  # C-ordered and ~5x faster than block[:, rows]
        return np.asarray(self.weights.T @ block[:, self.rows].T).T.astype(np.float32)


def map_landmarks(bundle: Bundle, ids, id_type: str = "auto", source="input") -> LandmarkMapping:
    """Map input gene ids onto the bundle's landmarks (``id_type`` auto: the type that finds the most)."""
    if id_type == "auto":
        found = {t: landmark_of(bundle, ids, t) for t in AUTO_ORDER}
        counts = {t: len(np.unique(v[v >= 0])) for t, v in found.items()}
        id_type = max(AUTO_ORDER, key=lambda t: counts[t])  # max keeps the first of equal counts
        if counts[id_type] == 0:
            raise InputError(
                f"{source}: cannot recognise the gene ids (e.g. {', '.join(map(str, list(ids)[:4]))}): none is a "
                f"landmark of the model as an Ensembl id, Entrez id, gene symbol or L1000/HG-U133A probe id; "
                f"put gene ids of one of these types in the first column (rows = genes) or pass --id-type"
            )
        log.info(
            "gene ids recognised as %s ids (%s)", id_type, ", ".join(f"{t}: {c} landmarks" for t, c in counts.items())
        )
        idx = found[id_type]
    else:
        idx = landmark_of(bundle, ids, id_type)
        if not (idx >= 0).any():
            raise InputError(
                f"{source}: none of the gene ids (e.g. {', '.join(map(str, list(ids)[:4]))}) is a landmark "
                f"{id_type} id of the model; pass the right --id-type (or --id-type auto)"
            )
    rows = np.flatnonzero(idx >= 0)
    landmark = idx[rows]
    order = np.argsort(landmark, kind="stable")
    rows, landmark = rows[order], landmark[order]
    present, counts = np.unique(landmark, return_counts=True)
    weights = None
    if (counts > 1).any():
        from scipy import sparse

        col = np.searchsorted(present, landmark)
        weights = sparse.csr_matrix(
            (1.0 / counts[col], (np.arange(len(rows)), col)), shape=(len(rows), len(present)), dtype=np.float32
        )
        log.info("%d landmarks are measured by several rows; their rows are averaged", int((counts > 1).sum()))
    return LandmarkMapping(id_type, present, rows, landmark, weights, bundle.n_landmarks)


def check_coverage(bundle: Bundle, mapping: LandmarkMapping, impute_missing: str, source="input") -> None:
    """Error (or, with ``impute_missing='mean'``, warn) about model landmarks absent from the input."""
    missing = mapping.missing
    if not len(missing):
        return
    L = bundle.n_landmarks
    lm = bundle.landmarks
    names = [s or e for s, e in zip(lm["symbol"].iloc[missing[:10]], lm["id"].iloc[missing[:10]])]
    listed = ", ".join(names) + (", ..." if len(missing) > 10 else "")
    n_present = len(mapping.present)
    if n_present < MIN_PRESENT_FRACTION * L:
        raise InputError(
            f"{source}: only {n_present} of the model's {L} landmark genes found as {mapping.id_type} ids "
            f"(missing e.g. {listed}); at least {MIN_PRESENT_FRACTION:.0%} are needed: check --id-type and "
            f"that rows are genes, or use a model trained on the genes you measured"
        )
    if impute_missing != "mean":
        raise InputError(
            f"{source}: {len(missing)} of the model's {L} landmark genes are missing ({listed}); add them, or "
            f"pass --impute-missing mean to fill them with the GEO training mean (predictions get less accurate)"
        )
    log.warning(
        "%d of %d landmark genes missing from %s, filled with the GEO training mean: %s",
        len(missing),
        L,
        source,
        listed,
    )


def _reference_for(bundle: Bundle, k: int) -> np.ndarray:
    """The GEO landmark reference at ``k`` evenly spaced quantiles, ``(k,)`` sorted.

    With every landmark present this is the reference itself; with some
    missing it approximates the distribution of the present ones.
    """
    ref = np.asarray(bundle.stats["landmark_quantiles"], dtype=np.float64)
    if k == len(ref):
        return ref
    pos = (np.arange(k) + 0.5) / k * len(ref) - 0.5
    return np.interp(pos, np.arange(len(ref)), ref)


# --------------------------------------------------------------------------- #
# the Python API
# --------------------------------------------------------------------------- #
def predict(
    bundle,
    x,
    *,
    id_type: str = "auto",
    impute_missing: str = "none",
    quantile_normalize: bool = False,
    device: str = "auto",
    batch_size: int = 4096,
):
    """Predict target-gene expression from landmark expression (log2, GEO scale).

    ``bundle``: a :class:`~dgex.bundle.Bundle` or the path of a bundle folder.
    ``x``: a numpy array ``(n_samples, n_landmarks)`` with columns in
    ``bundle.landmarks`` order -> numpy array ``(n_samples, n_targets)`` in
    ``bundle.targets`` order; or a DataFrame ``(n_samples, n_genes)`` whose
    columns are gene ids (any id type, see ``id_type``) -> DataFrame
    ``(n_samples, n_targets)`` with the targets' ids (``bundle.targets["id"]``) as columns.
    """
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle, device=pick_device(device))
    if isinstance(x, pd.DataFrame):
        mapping = map_landmarks(bundle, list(x.columns), id_type, source="DataFrame columns")
        check_coverage(bundle, mapping, impute_missing, source="DataFrame columns")
        values = mapping.gather(x.to_numpy(dtype=np.float32))
        check_finite(values, [str(i) for i in x.index], "DataFrame")
        out = _predict_present(bundle, values, mapping.present, quantile_normalize, batch_size)
        return pd.DataFrame(out, index=x.index, columns=pd.Index(bundle.targets["id"], name="id"))
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != bundle.n_landmarks:
        raise InputError(
            f"expected landmark expression of shape (n_samples, {bundle.n_landmarks}), got "
            f"{x.shape}; order the columns as bundle.landmarks or pass a DataFrame with gene ids"
        )
    check_finite(x, [f"row {i}" for i in range(len(x))], "array")
    return _predict_present(bundle, x, np.arange(bundle.n_landmarks), quantile_normalize, batch_size)


def _predict_present(
    bundle: Bundle, x: np.ndarray, present: np.ndarray, quantile_normalize: bool, batch_size: int
) -> np.ndarray:
    """Targets ``(n, T)`` from the present landmarks ``x`` ``(n, k)``."""
    full = len(present) == bundle.n_landmarks
    present_t = None if full else torch.as_tensor(present, device=bundle.device)
    ref = _reference_for(bundle, len(present)) if quantile_normalize else None
    out = np.empty((x.shape[0], bundle.n_targets), dtype=np.float32)
    for s in range(0, x.shape[0], batch_size):
        block = x[s : s + batch_size]
        if ref is not None:
            from .preprocess import quantile_map  # imports scikit-learn: only when needed

            block = quantile_map(block, ref).astype(np.float32)
        xt = torch.as_tensor(np.ascontiguousarray(block), device=bundle.device)
        out[s : s + len(block)] = bundle.predict_tensor(xt, present_t).cpu().numpy()
    return out


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
class _BufferedWriter:
    """Writes output batches in a thread, so writing overlaps the next batch's compute.

    The caller fills one of ``n_buffers`` preallocated ``shape`` arrays
    (:meth:`buffer`), hands it over (:meth:`put`) and the thread passes its
    first ``k`` rows to ``sink`` and recycles it: memory is bounded and no
    batch allocates.  An error in the thread is raised in the caller at its
    next call.
    """

    def __init__(self, sink, shape: tuple[int, int], n_buffers: int = 3):
        self._sink, self._error = sink, None
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            self._free.put(np.empty(shape, dtype=np.float32))
        self._todo: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dgex-writer", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._todo.get()
            if item is None:
                return
            buf, k = item
            try:
                if self._error is None:
                    self._sink(buf[:k])
            except BaseException as exc:  # re-raised in the caller
                self._error = exc
            finally:
                self._free.put(buf)

    def _check(self):
        if self._error is not None:
            raise self._error

    def buffer(self) -> np.ndarray:
        while True:
            self._check()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                continue

    def put(self, buf: np.ndarray, k: int) -> None:
        self._check()
        self._todo.put((buf, k))

    def close(self) -> None:
        self._todo.put(None)
        self._thread.join()
        self._check()


def _prefetch(chunks, depth: int = 1):
    """Iterate ``chunks`` in a thread, ``depth`` items ahead (reading overlaps compute); errors are re-raised."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        # never block for good: the consumer may have stopped (an error) and be joining this thread
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run():
        try:
            for item in chunks:
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:
            offer(exc)

    thread = threading.Thread(target=run, name="dgex-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class _InputQuality:
    """Flat samples and constant landmarks of an input seen chunk by chunk (warnings only).

    A flat profile (s.d. across the landmarks below :data:`~dgex.io.FLAT_SAMPLE_STD`)
    is a failed array or an unmeasured sample; a landmark with one value in every
    sample was probably not measured.  Both are predicted as given, so the user is told.
    """

    def __init__(self, k: int):
        self.n = 0
        self.flat: list[int] = []
        self.flat_count = 0
        self.lo = np.full(k, np.inf, dtype=np.float32)
        self.hi = np.full(k, -np.inf, dtype=np.float32)

    def update(self, x: np.ndarray, start: int) -> None:
        """Account for the chunk ``x`` ``(n, k)`` of samples ``start:start + n``."""
        flat = np.flatnonzero(flat_samples(x))
        self.flat_count += len(flat)
        self.flat.extend((start + flat[: max(0, 5 - len(self.flat))]).tolist())
        np.minimum(self.lo, x.min(axis=0), out=self.lo)
        np.maximum(self.hi, x.max(axis=0), out=self.hi)
        self.n += len(x)

    def warn(self, bundle: Bundle, mapping: LandmarkMapping, col_ids, source) -> None:
        if self.flat_count:
            log.warning(
                "%s: %d of %d samples have a flat landmark profile (s.d. < %g log2 units: failed arrays?), e.g. %s; "
                "their predictions are written but carry no information",
                source,
                self.flat_count,
                self.n,
                FLAT_SAMPLE_STD,
                ", ".join(str(col_ids[i]) for i in self.flat),
            )
        const = np.flatnonzero(self.hi - self.lo < CONSTANT_GENE_STD) if self.n >= 2 else np.array([], int)
        if len(const):
            lm = bundle.landmarks.iloc[mapping.present[const[:5]]]
            names = [s or e for s, e in zip(lm["symbol"], lm["id"])]
            log.warning(
                "%s: %d of %d landmark genes have the same value in all %d samples (e.g. %s); predictions use "
                "that value as given: if they were not measured, drop their rows and pass --impute-missing mean",
                source,
                len(const),
                len(mapping.present),
                self.n,
                ", ".join(names),
            )


def _output_format(output: Path, fmt: str | None) -> str:
    """The format written to ``output``: from ``fmt`` or the extension; the two must agree."""
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(
            f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})"
            + (
                "; parquet output is not offered: write .gctx (any size), .h5ad or .csv/.tsv"
                if fmt == "parquet"
                else ""
            )
        )
    name = output.name.lower()
    by_name = next((f for f, exts in EXTENSIONS.items() if name.endswith(exts)), None)
    suffix = "".join(s for s in output.suffixes[-2:] if s.lower() in PROMISING_SUFFIXES | {".gctx", ".h5"})
    if by_name is None and suffix:
        lower = suffix.lower()
        if lower.endswith(".gz") and lower.removesuffix(".gz") in (".gctx", ".h5"):
            fix = f"GCTX is HDF5, written uncompressed: name it {output.name[: -len('.gz')]}"
        elif ".parquet" in lower:
            fix = "parquet output is not offered: write .gctx (any size), .h5ad or .csv/.tsv"
        else:
            fix = "name it .gctx, .h5ad, .csv or .tsv (text optionally .gz)"
        raise ConfigError(f"{output}: the extension {suffix} promises a format that dgex infer does not write; {fix}")
    if fmt is None:
        if by_name is None:
            raise ConfigError(
                f"{output}: cannot tell the output format from the extension; name it .gctx, .h5ad, .csv or .tsv, "
                f"or pass --format"
            )
        return by_name
    if by_name is not None and by_name != fmt:
        raise ConfigError(
            f"{output}: the extension {next(e for e in EXTENSIONS[by_name] if name.endswith(e))} promises "
            f"{by_name} but --format {fmt} writes {fmt}; name it "
            f"{' or '.join(e for e in EXTENSIONS[fmt] if not e.endswith('.gz'))} or drop --format"
        )
    return fmt


def auto_batch_size(n_targets: int) -> int:
    """Samples per predicted batch: about :data:`BATCH_BYTES` of float32 output, within 256..8192."""
    return int(min(8192, max(256, BATCH_BYTES // (4 * max(1, n_targets)))))


def sidecar_path(output: Path) -> Path:
    """The provenance sidecar of a text output: ``<output>.provenance.json``."""
    return output.with_name(output.name + ".provenance.json")


# --------------------------------------------------------------------------- #
# what an output holds besides the predictions: rows, provenance, column metadata
# --------------------------------------------------------------------------- #
def output_rows(bundle: Bundle, mapping: LandmarkMapping, include_landmarks: bool) -> tuple[np.ndarray, pd.DataFrame]:
    """Row ids ``(n_rows,)`` and row metadata ``(n_rows, n_fields)`` of an inferred matrix.

    Rows are the targets in output order (every column of
    :attr:`~dgex.bundle.Bundle.target_table`), then with ``include_landmarks``
    the landmarks in input order.  Flags: ``pr_is_lm`` (1: the input's measured
    landmark value), ``pr_is_inferred`` (1: predicted by the model) and
    ``pr_is_imputed`` (1: a landmark absent from the input, written as the GEO
    training mean).  The row id is the table's neutral ``id``; a landmark row
    whose id is also a target's gets ``<id>_measured`` so that row ids stay unique.
    """
    targets = bundle.target_table
    flags = {"pr_is_lm": 0, "pr_is_inferred": 1, "pr_is_imputed": 0}
    targets = targets.assign(**flags)
    if not include_landmarks:
        return targets["id"].to_numpy(dtype=object), targets.drop(columns="id")
    lm = bundle.landmark_table
    imputed = np.ones(len(lm), dtype=np.int64)
    imputed[mapping.present] = 0
    lm = lm.assign(pr_is_lm=1, pr_is_inferred=0, pr_is_imputed=imputed)
    clash = lm["id"].isin(targets["id"])
    lm.loc[clash, "id"] = lm.loc[clash, "id"] + "_measured"
    rows = pd.concat([targets, lm], ignore_index=True)[targets.columns]
    text = [c for c in rows.columns if rows[c].dtype == object]
    rows[text] = rows[text].fillna("")  # landmarks have no part (nor per-target fields)
    return rows["id"].to_numpy(dtype=object), rows.drop(columns="id")


def provenance(bundle: Bundle, input: Path, mapping: LandmarkMapping, options: dict) -> dict:
    """Provenance of one inferred output: the bundle's (:meth:`~dgex.bundle.Bundle.provenance`) and this run's.

    All values are strings (they become GCTX column-metadata fields, AnnData
    ``uns`` entries and the text sidecar's fields); ``warning`` is non-empty
    when the model was trained on synthetic demo data.
    """
    from . import __version__

    out = dict(bundle.provenance())
    synthetic = out["training_synthetic"] == "yes"
    out.update(
        {
            "dgex_version": __version__,
            "created": _created(),
            "input": str(input),
            "id_type": mapping.id_type,
            "landmarks_present": str(len(mapping.present)),
            "landmarks_imputed": str(len(mapping.missing)),
            **{k: str(v) for k, v in options.items()},
            "warning": SYNTHETIC_WARNING if synthetic else "",
        }
    )
    return out


def _created() -> str:
    """Creation time of this output, ISO 8601 with UTC offset; ``SOURCE_DATE_EPOCH`` (reproducible builds) fixes it."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():  # reruns then write byte-identical files
        return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(int(epoch)))
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


SYNTHETIC_WARNING = "the model was trained on synthetic demo data: its predictions mean nothing for real samples"


def _flag_well_inferred(row_meta: pd.DataFrame, criterion: str, model) -> pd.DataFrame:
    """``row_meta`` with the ``well_inferred`` flag (:func:`dgex.bundle.well_inferred`) when the bundle can tell."""
    flags = well_inferred_flags(row_meta, criterion)
    if flags is None:
        if criterion.strip().lower() != "none":
            log.info("%s carries no per-target reliability (exported before dgex had it): no well_inferred flag", model)
        return row_meta
    log.info("well_inferred (%s): %d of %d rows", criterion, int(flags.sum()), len(flags))
    return row_meta.assign(well_inferred=flags)


def _warn_about_training(bundle: Bundle, model) -> None:
    """One log line when the bundle was trained on synthetic data (warning) or does not say (info)."""
    synthetic = bundle.training_data.get("synthetic")
    if synthetic is True:
        log.warning("%s: %s", model, SYNTHETIC_WARNING)
    elif synthetic is None:
        log.info("%s records no training data (%s)", model, bundle.training_data.get("description", "unknown"))


def _column_metadata(reader, prov: dict) -> pd.DataFrame:
    """The input's column metadata ``(n_samples, n_fields)`` plus each provenance field as ``dgex_<key>``."""
    try:
        meta = reader.col_meta()
    except Exception:  # the input's metadata are a courtesy: never fail a prediction on them
        meta = None
    n = reader.n_cols
    meta = pd.DataFrame(index=range(n)) if meta is None else meta.reset_index(drop=True)
    fields = pd.DataFrame({f"dgex_{k}": np.full(n, v, dtype=object) for k, v in prov.items()})
    return pd.concat([meta.drop(columns=[c for c in fields.columns if c in meta.columns]), fields], axis=1)


# --------------------------------------------------------------------------- #
# where predictions go
# --------------------------------------------------------------------------- #
class _Collected:
    """Batches kept in memory for the formats written in one go at the end (text, AnnData)."""

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.blocks: list[np.ndarray] = []

    def matrix(self) -> np.ndarray:
        """All samples ``(n_samples, n_rows)``."""
        return np.concatenate(self.blocks)


def _open_sink(fmt, output, row_ids, row_meta, col_ids, col_meta, batch_size):
    """``(writer, sink)``: a GCTX written in a thread batch by batch, or ``(None, _Collected)``."""
    if fmt != "gctx":
        return None, _Collected(len(row_ids))
    writer = GCTXWriter(output, row_ids, col_ids, row_meta=row_meta, col_meta=col_meta)
    return writer, _BufferedWriter(writer.write, (batch_size, len(row_ids)))


def _write_table(path: Path, fmt: str, y: np.ndarray, col_ids, row_ids, row_meta: pd.DataFrame, prov: dict) -> None:
    """Genes x samples text: ``id``, the row metadata, then one column per sample; ``y`` ``(n_samples, n_rows)``.

    The provenance goes to :func:`sidecar_path` (JSON), written first, so the
    table itself stays a plain table any CSV reader takes; a failed table write
    removes the sidecar again.
    """
    from .io import write_json

    df = pd.concat(
        [
            pd.DataFrame({"id": row_ids}),
            row_meta.reset_index(drop=True),
            pd.DataFrame(y.T, columns=[str(c) for c in col_ids]),
        ],
        axis=1,
    )
    sidecar = sidecar_path(path)
    write_json(sidecar, {"dgex_inferred_matrix": path.name, **prov})
    ok = False
    try:
        with atomic_path(path) as tmp:
            df.to_csv(
                tmp,
                sep="," if fmt == "csv" else "\t",
                index=False,
                float_format="%.6g",
                compression="gzip" if path.name.lower().endswith(".gz") else None,
            )
        ok = True
    finally:
        if not ok:
            sidecar.unlink(missing_ok=True)


def _write_h5ad(path: Path, y: np.ndarray, col_ids, col_meta: pd.DataFrame, row_ids, row_meta, prov: dict) -> None:
    """Write an AnnData file: ``X`` ``(n_samples, n_rows)``, obs = samples, var = genes.

    obs carries the input's column metadata, var the row metadata and
    ``uns['dgex_provenance']`` the provenance; written to a temporary file and
    renamed into place.
    """
    import anndata

    obs = col_meta[[c for c in col_meta.columns if not c.startswith("dgex_")]].copy()
    obs.index = pd.Index([str(c) for c in col_ids], name="sample")
    var = row_meta.copy()
    var.index = pd.Index([str(r) for r in row_ids], name="id")
    adata = anndata.AnnData(X=np.ascontiguousarray(y, dtype=np.float32), obs=obs, var=var)
    adata.uns["dgex_provenance"] = dict(prov)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, convert_strings_to_categoricals=False)  # strings stay strings


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def _check_request(output: Path, input: Path, model, fmt: str, overwrite: bool) -> None:
    """Refuse outputs that cannot be written or would replace an input or an existing file."""
    check_output_path(output)
    refuse_overwriting_inputs([output], {"--input": input, "--model": model})
    if fmt == "h5ad":
        try:
            import anndata  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"{output}: .h5ad output needs the anndata package, which is not installed; install the pinned "
                f"environment (pip install -r envs/requirements.txt) or write .gctx"
            ) from None
    written = [output, sidecar_path(output)] if fmt in ("csv", "tsv") else [output]
    for path in written:
        if path.exists() and not overwrite:
            raise InputError(f"{path} exists; pass --overwrite to replace it or choose another --output")


def _check_samples(input: Path, n: int, fmt: str, force: bool) -> None:
    if n == 0:
        raise InputError(f"{input}: no samples (columns); pass a genes x samples matrix")
    if fmt != "gctx" and n > MAX_TEXT_SAMPLES and not force:
        raise InputError(
            f"{input}: {n} samples is too many for {fmt} output (built in memory, "
            f"> {MAX_TEXT_SAMPLES}); write .gctx, or pass --force"
        )


def _check_first_chunk(bundle: Bundle, x: np.ndarray, input: Path, quantile_normalize: bool) -> None:
    """Scale checks on the first samples ``x`` ``(n, k)``: refuse linear or ratio data, hint at --quantile-normalize."""
    check_scale(
        x[:2000],
        input,
        linear_fix="log2(x + 1)-transform the input and retry",
        ratio_fix="use expression values (e.g. L1000 level 3, not 4/5)",
    )
    ref_med = float(np.median(bundle.stats["landmark_quantiles"]))
    med = float(np.median(x[:2000]))
    if not quantile_normalize and abs(med - ref_med) > 2.0:
        log.warning(
            "median landmark value %.2f of %s differs from the GEO reference's %.2f: consider --quantile-normalize",
            med,
            input,
            ref_med,
        )


class _Predictor:
    """Fills output rows for batches of present landmarks: targets first, then (optionally) the landmarks.

    ``x`` ``(n, k)`` holds the input's present landmarks (``mapping.present`` order);
    the filled block is ``(n, n_targets [+ n_landmarks])``.
    """

    def __init__(self, bundle: Bundle, mapping: LandmarkMapping, quantile_normalize: bool, include_landmarks: bool):
        self.bundle, self.mapping, self.include_landmarks = bundle, mapping, include_landmarks
        dev = bundle.device
        self.present_t = (
            None if len(mapping.present) == bundle.n_landmarks else torch.as_tensor(mapping.present, device=dev)
        )
        self.ref = _reference_for(bundle, len(mapping.present)) if quantile_normalize else None
        self.lm_mean = np.asarray(bundle.stats["landmark_mean"], dtype=np.float32)
        self.n_rows = bundle.n_targets + (bundle.n_landmarks if include_landmarks else 0)

    def fill(self, x: np.ndarray, out: np.ndarray) -> None:
        """Write the rows of the ``len(x)`` samples into ``out`` ``(len(x), n_rows)``."""
        bundle, T = self.bundle, self.bundle.n_targets
        xb = x
        if self.ref is not None:
            from .preprocess import quantile_map  # imports scikit-learn: only when needed

            xb = quantile_map(x, self.ref).astype(np.float32)
        xt = torch.as_tensor(np.ascontiguousarray(xb), device=bundle.device)
        host = torch.from_numpy(out)
        if bundle.device.type == "cpu":
            bundle.predict_tensor(xt, self.present_t, out=host[:, :T])
        else:
            host[:, :T].copy_(bundle.predict_tensor(xt, self.present_t))
        if self.include_landmarks:  # the measured values as given (before any quantile mapping)
            lm = out[:, T:]
            lm[:] = self.lm_mean
            lm[:, self.mapping.present] = x


def _predict_all(reader, mapping, predictor, sink, input, chunk_size, batch_size, quality, progress) -> None:
    """Read the input chunk by chunk (one ahead, in a thread), predict batch by batch and hand batches to ``sink``."""
    from tqdm.auto import tqdm

    col_ids = reader.col_ids
    chunks = ((start, stop, mapping.gather(block)) for start, stop, block in reader.iter_samples(chunk_size))
    with tqdm(total=reader.n_cols, unit="profile", desc="infer", disable=not progress, dynamic_ncols=True) as bar:
        for start, stop, x in _prefetch(chunks):  # x: (chunk, k) present landmarks
            check_finite(x, col_ids[start:stop], input)
            quality.update(x, start)
            if start == 0:
                _check_first_chunk(predictor.bundle, x, input, predictor.ref is not None)
            for s in range(0, len(x), batch_size):
                xb = x[s : s + batch_size]
                if isinstance(sink, _Collected):
                    block = np.empty((len(xb), sink.n_rows), dtype=np.float32)
                    predictor.fill(xb, block)
                    sink.blocks.append(block)
                    continue
                buf = sink.buffer()
                predictor.fill(xb, buf[: len(xb)])
                sink.put(buf, len(xb))
            bar.update(stop - start)


def _close_gctx(writer, sink, ok: bool) -> None:
    """Finish the GCTX thread and file: renamed into place when ``ok``, removed otherwise."""
    if ok and sink is not None:
        sink.close()
        sink = None
    if sink is not None:  # failed: stop the thread before the temporary file goes
        try:  # noqa: SIM105 -- a plain try: dgex's signal deferral treats contextlib frames specially
            sink.close()
        except BaseException:
            pass
    if writer is not None:
        writer.close(ok=ok)


def infer(
    *,
    model,
    input,
    output,
    id_type: str = "auto",
    output_format: str | None = None,
    chunk_size: int = 4096,
    batch_size: int | None = None,
    impute_missing: str = "none",
    quantile_normalize: bool = False,
    include_landmarks: bool = False,
    well_inferred: str = WELL_INFERRED,
    device: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Predict the targets of every sample of ``input`` with the bundle ``model`` and write ``output``.

    ``chunk_size`` samples are read at a time (one chunk ahead, in a thread)
    and ``batch_size`` (default: :func:`auto_batch_size`) predicted and
    written at a time (the writing in a thread), so memory does not grow with
    the number of samples for GCTX input and output.  ``include_landmarks``
    adds the input's measured landmarks as flagged rows (:func:`output_rows`).
    Every output records :func:`provenance`.  Returns a summary dict.
    """
    fmt = _output_format(Path(output), output_format)  # first: it explains what a wrong format means
    InferSettings.check(locals())
    output, input = Path(output), Path(input)
    _check_request(output, input, model, fmt, overwrite)

    t0 = time.time()
    bundle = load_bundle(model, device=pick_device(device))
    log.info("%s: %s", model, bundle.describe())
    _warn_about_training(bundle, model)
    with open_matrix(input) as reader:
        mapping = map_landmarks(bundle, reader.row_ids, id_type, source=str(input))
        check_coverage(bundle, mapping, impute_missing, source=str(input))
        n = reader.n_cols
        _check_samples(input, n, fmt, force)
        options = {"quantile_normalize": bool(quantile_normalize), "include_landmarks": bool(include_landmarks)}
        prov = provenance(bundle, input, mapping, options)
        row_ids, row_meta = output_rows(bundle, mapping, include_landmarks)
        row_meta = _flag_well_inferred(row_meta, well_inferred, model)
        col_ids, col_meta = reader.col_ids, _column_metadata(reader, prov)
        batch_size = min(batch_size or auto_batch_size(len(row_ids)), chunk_size, n)  # batches never span chunks
        predictor = _Predictor(bundle, mapping, quantile_normalize, include_landmarks)
        quality = _InputQuality(len(mapping.present))
        writer, sink = _open_sink(fmt, output, row_ids, row_meta, col_ids, col_meta, batch_size)
        ok = False
        try:
            _predict_all(reader, mapping, predictor, sink, input, chunk_size, batch_size, quality, progress)
            ok = True
        finally:
            if writer is not None:
                _close_gctx(writer, sink, ok)
    if fmt in ("csv", "tsv"):
        _write_table(output, fmt, sink.matrix(), col_ids, row_ids, row_meta, prov)
    elif fmt == "h5ad":
        _write_h5ad(output, sink.matrix(), col_ids, col_meta, row_ids, row_meta, prov)
    quality.warn(bundle, mapping, col_ids, input)
    return _summary(model, input, output, fmt, bundle, mapping, n, quantile_normalize, batch_size, time.time() - t0)


def _summary(model, input, output, fmt, bundle, mapping, n, quantile_normalize, batch_size, wall) -> dict:
    """The summary :func:`infer` returns, also logged as one line."""
    summary = {
        "model": str(model),
        "input": str(input),
        "output": str(output),
        "format": fmt,
        "samples": int(n),
        "targets": bundle.n_targets,
        "landmarks_present": int(len(mapping.present)),
        "landmarks_imputed": int(len(mapping.missing)),
        "id_type": mapping.id_type,
        "quantile_normalize": bool(quantile_normalize),
        "device": str(bundle.device),
        "batch_size": int(batch_size),
        "seconds": round(wall, 3),
        "profiles_per_second": n / max(wall, 1e-9),
    }
    log.info(
        "predicted %d targets for %d samples (%s ids, %d/%d landmarks) in %.2f s (%.0f profiles/s) -> %s",
        bundle.n_targets,
        n,
        mapping.id_type,
        len(mapping.present),
        bundle.n_landmarks,
        wall,
        summary["profiles_per_second"],
        output,
    )
    return summary
