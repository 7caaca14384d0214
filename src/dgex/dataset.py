"""The processed-dataset file written by ``dgex preprocess`` and read by every later stage.

One HDF5 file per run (``format`` attribute = :data:`dgex.DATASET_FORMAT`)::

    /genes/landmark/{ensembl, symbol, entrez}          (L,)
    /genes/target/{ensembl, symbol, entrez}            (T,)  sorted by part
    /genes/target/part                                 (T,)  int, 0..n_parts-1
    /genes/target/overlap                              (T,)  bool: gene is also a landmark
    /splits/<split>/X                                  (n, L) float32, standardised
    /splits/<split>/Y                                  (n, T) float32, standardised
    /splits/<split>/ids                                (n,)   sample ids
    /stats/<source>/{mean, std}                        (L+T,) float64, landmarks first
    /reference/gene_quantiles                          (L+T,) GEO reference distribution
    /reference/probe_quantiles                         (P,)   only if GEO was quantile normalised

``<split>`` is one of :data:`SPLITS` (only those whose input was given);
``<source>`` is ``geo``, ``1000g`` or ``gtex``.  Values were standardised
per gene as ``(x - mean) / (std + epsilon)`` with the statistics of their own
source (GEO: all profiles or training profiles only, see the ``standardize``
attribute).  Because target genes are sorted by part, a part's columns are
one contiguous slice of ``Y``.

The ``fingerprint`` attribute (JSON, :func:`content_fingerprint`) identifies the
training-relevant content: a SHA-256 of every array (genes, parts, each split's
sample ids and values, statistics, references) and of the standardisation
settings, per component and overall.  ``dgex preprocess`` stores it once while
writing; a file without it (an older dgex) gets it computed on opening.
Paths and run parameters that do not change the content (input/output paths,
chunk sizes) are left out, so re-preprocessing the same inputs elsewhere gives
the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from . import DATASET_FORMAT
from .errors import InputError

log = logging.getLogger(__name__)

#: Evaluation splits in paper order: GEO train/validation/test, 1000G validation, GTEx test.
SPLITS = ("geo-tr", "geo-va", "geo-te", "1000g-va", "gtex-te")
#: Splits every trained model is evaluated on (all but the training split).
EVAL_SPLITS = SPLITS[1:]
#: Validation splits that choose a model: the best epoch of a run, a baseline's hyper-parameter, a grid point.
SELECTIONS = ("geo-va", "1000g-va")
SOURCE_OF = {"geo-tr": "geo", "geo-va": "geo", "geo-te": "geo", "1000g-va": "1000g", "gtex-te": "gtex"}
#: The gene-table columns under ``/genes/<role>``.
GENE_COLUMNS = {
    "landmark": ("ensembl", "symbol", "entrez"),
    "target": ("ensembl", "symbol", "entrez", "part", "overlap"),
}


#: Version of the fingerprint definition; a new definition must not compare equal to an old one.
FINGERPRINT_VERSION = 1
#: Bytes hashed per read: bounds the memory of fingerprinting and of the finiteness check.
_BLOCK_BYTES = 64 << 20
#: File attributes that change the meaning of the values (``params`` is left out: it holds paths).
_FINGERPRINT_ATTRS = ("format", "standardize", "epsilon")


def _strings(ds) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


def encode(values) -> np.ndarray:
    """``values`` as an array of UTF-8 byte strings (HDF5's fixed-length string type)."""
    return np.array([str(v).encode() for v in values], dtype="S")


def _row_blocks(n_rows: int, row_bytes: int):
    step = max(1, _BLOCK_BYTES // max(1, row_bytes))
    return ((s, min(n_rows, s + step)) for s in range(0, n_rows, step))


def _hash_dataset(h, ds: h5py.Dataset) -> None:
    """Feed name, dtype, shape and the values of ``ds`` to the hash ``h``, reading in bounded row blocks."""
    h.update(f"{ds.name}|{ds.dtype.str}|{ds.shape}\n".encode())
    if ds.dtype.kind in "OU":  # variable-length strings: hash the decoded text
        h.update("\x00".join(_strings(ds)).encode())
    elif ds.ndim == 0:
        h.update(np.ascontiguousarray(ds[()]).tobytes())
    else:
        row_bytes = ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
        blocks = list(_row_blocks(ds.shape[0], row_bytes))
        # one reused buffer: several times faster than a fresh array per block
        buf = np.empty((blocks[0][1] if blocks else 0, *ds.shape[1:]), dtype=ds.dtype)
        for s, e in blocks:
            ds.read_direct(buf, np.s_[s:e], np.s_[0 : e - s])
            h.update(buf[: e - s])


def _datasets_under(h5: h5py.File, group: str) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    if group in h5:
        h5[group].visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return sorted(found, key=lambda d: d.name)


def content_fingerprint(h5: h5py.File) -> dict:
    """The fingerprint of an open processed dataset: ``{"version", "sha256", "components"}``.

    ``components`` maps ``genes``, ``<split>/ids``, ``<split>/X``, ``<split>/Y``,
    ``stats``, ``reference`` and ``settings`` to the SHA-256 of their arrays;
    ``sha256`` hashes them all.  Reads every value once, in bounded blocks.
    """
    components = {}
    for group in ("genes", "stats", "reference"):
        h = hashlib.sha256()
        for ds in _datasets_under(h5, group):
            _hash_dataset(h, ds)
        components[group] = h.hexdigest()
    for split in SPLITS:
        if f"splits/{split}" not in h5:
            continue
        for what in ("ids", "X", "Y"):
            h = hashlib.sha256()
            if f"splits/{split}/{what}" in h5:
                _hash_dataset(h, h5[f"splits/{split}/{what}"])
            components[f"{split}/{what}"] = h.hexdigest()
    # the sample filter only where one was used: unfiltered datasets keep their fingerprints
    settings = {k: h5.attrs.get(k) for k in _FINGERPRINT_ATTRS + (("filter",) if "filter" in h5.attrs else ())}
    settings = {
        k: (v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v) for k, v in settings.items()
    }
    components["settings"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    overall = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, components], sort_keys=True).encode()).hexdigest()
    return {"version": FINGERPRINT_VERSION, "sha256": overall, "components": components}


def fingerprint_differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words (empty if they are equal)."""
    if old.get("version") != new.get("version"):
        return [f"fingerprint version {old.get('version')} vs {new.get('version')}"]
    a, b = old.get("components", {}), new.get("components", {})
    out = []
    if a.get("genes") != b.get("genes"):
        out.append("other genes or target parts")
    for split in SPLITS:
        had, has = f"{split}/ids" in a, f"{split}/ids" in b
        if had and not has:
            out.append(f"no split {split}")
        elif has and not had:
            out.append(f"an extra split {split}")
        elif had:
            if a[f"{split}/ids"] != b[f"{split}/ids"]:
                out.append(f"other samples in {split}")
            elif any(a.get(f"{split}/{w}") != b.get(f"{split}/{w}") for w in ("X", "Y")):
                out.append(f"other values in {split}")
    for key, words in (("stats", "other standardisation statistics"), ("reference", "another quantile reference")):
        if a.get(key) != b.get(key):
            out.append(words)
    if a.get("settings") != b.get("settings"):
        out.append("other standardisation settings")
    if not out and old.get("sha256") != new.get("sha256"):
        out.append("other content")
    return out


@dataclass
class GeneTables:
    """The dataset's gene tables: landmarks (inputs) and targets (outputs), in column order.

    ``landmarks`` has columns ``ensembl, symbol, entrez``; ``targets`` adds
    ``part`` (the target part whose network predicts the gene) and ``overlap``
    (the gene is also a landmark).
    """

    landmarks: pd.DataFrame  # ensembl, symbol, entrez
    targets: pd.DataFrame  # ensembl, symbol, entrez, part, overlap

    def part_slice(self, part: int) -> slice:
        """Columns of ``Y`` that hold target part ``part``."""
        idx = np.flatnonzero(self.targets["part"].values == part)
        if idx.size == 0:
            raise InputError(f"target part {part} does not exist (parts: 0..{self.n_parts - 1})")
        return slice(int(idx[0]), int(idx[-1]) + 1)

    @property
    def n_parts(self) -> int:
        """Number of target parts (separately trained networks)."""
        return int(self.targets["part"].max()) + 1


class ProcessedDataset:
    """Read access to a processed dataset; arrays are ``(n_samples, n_genes)`` float32."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: processed dataset not found; run `dgex preprocess` first")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(f"{self.path}: corrupt processed dataset ({exc}); rerun `dgex preprocess`") from None
        fmt = self._h5.attrs.get("format")
        if fmt != DATASET_FORMAT:
            self._h5.close()
            raise InputError(
                f"{self.path}: dataset format {fmt!r}, this dgex reads format {DATASET_FORMAT}; "
                f"rerun `dgex preprocess` with this version"
            )
        self.attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self._h5.attrs.items()}
        try:
            try:
                self.params = json.loads(self.attrs.get("params", "{}"))
            except ValueError:
                raise self._damaged("unreadable 'params' attribute") from None
            self._check_layout()
        except BaseException:
            self._h5.close()
            raise

    def _damaged(self, what: str) -> InputError:
        return InputError(
            f"{self.path}: {what}: the processed dataset is incomplete or damaged; rerun `dgex preprocess`"
        )

    def _node(self, name: str):
        """The HDF5 object ``name``; a one-line error naming the file if it is missing."""
        try:
            return self._h5[name]
        except KeyError:
            raise self._damaged(f"no /{name}") from None

    def _check_layout(self) -> None:
        """Every group and array of the format (module docstring), with consistent shapes (metadata only: cheap)."""
        n_lm = n_tg = None
        for role in ("landmark", "target"):
            cols = GENE_COLUMNS[role]
            lengths = {c: self._node(f"genes/{role}/{c}").shape for c in cols}
            if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
                raise self._damaged(f"the /genes/{role} columns have different lengths ({lengths})")
            n = next(iter(lengths.values()))[0]
            if n < 1:
                raise self._damaged(f"no {role} genes")
            n_lm, n_tg = (n, n_tg) if role == "landmark" else (n_lm, n)
        for split in self.splits:
            x, y, ids = (self._node(f"splits/{split}/{k}") for k in ("X", "Y", "ids"))
            if x.ndim != 2 or y.ndim != 2 or x.shape != (ids.shape[0], n_lm) or y.shape != (ids.shape[0], n_tg):
                raise self._damaged(
                    f"split {split} has X {x.shape}, Y {y.shape}, ids {ids.shape}, expected "
                    f"(n, {n_lm}), (n, {n_tg}), (n,)"
                )
            for stat in ("mean", "std"):
                if self._node(f"stats/{SOURCE_OF[split]}/{stat}").shape != (n_lm + n_tg,):
                    raise self._damaged(f"/stats/{SOURCE_OF[split]}/{stat} does not have {n_lm + n_tg} values")

    @property
    def splits(self) -> list[str]:
        """The splits the dataset holds, in :data:`SPLITS` order."""
        return [s for s in SPLITS if f"splits/{s}" in self._h5]

    def genes(self) -> GeneTables:
        """The landmark and target gene tables (see :class:`GeneTables`)."""
        g = self._node("genes")
        lm = pd.DataFrame({k: _strings(g["landmark"][k]) for k in ("ensembl", "symbol", "entrez")})
        tg = pd.DataFrame({k: _strings(g["target"][k]) for k in ("ensembl", "symbol", "entrez")})
        tg["part"] = g["target/part"][()]
        tg["overlap"] = g["target/overlap"][()].astype(bool)
        return GeneTables(lm, tg)

    def has(self, split: str) -> bool:
        """Whether the dataset holds ``split``."""
        return f"splits/{split}" in self._h5

    def fingerprint(self) -> dict:
        """The content fingerprint (see :func:`content_fingerprint`): stored by preprocess, else computed."""
        stored = self.attrs.get("fingerprint")
        if stored:
            try:
                fp = json.loads(stored)
                if fp.get("version") == FINGERPRINT_VERSION and fp.get("sha256") and fp.get("components"):
                    return fp
            except (ValueError, AttributeError):
                pass
            log.warning("%s: unreadable fingerprint attribute; computing it from the content", self.path)
        t0 = time.time()
        fp = content_fingerprint(self._h5)
        log.info(
            "%s has no stored fingerprint (written by an older dgex): computed in %.1f s; "
            "rerun `dgex preprocess` to store it",
            self.path,
            time.time() - t0,
        )
        return fp

    def X(self, split: str) -> np.ndarray:
        """Landmarks of ``split``: ``(n_samples, n_landmarks)``; NaN/Inf is an error."""
        return self._finite(self._node(f"splits/{split}/X")[()], split, "landmark (X)")

    def Y(self, split: str, part: int | None = None) -> np.ndarray:
        """Targets of ``split`` (one part or all): ``(n_samples, n_targets_sel)``; NaN/Inf is an error."""
        ds = self._node(f"splits/{split}/Y")
        if part is None:
            return self._finite(ds[()], split, "target (Y)")
        sl = self.genes().part_slice(part)
        return self._finite(ds[:, sl], split, "target (Y)")

    def _finite(self, a: np.ndarray, split: str, what: str) -> np.ndarray:
        """``a`` ``(n_samples, n_genes)`` unchanged, or an error naming the split and first bad sample.

        preprocess never writes NaN/Inf, so one means a damaged file; say so here
        rather than let training report it as divergence.
        """
        step = max(1, _BLOCK_BYTES // max(1, a[:1].nbytes))  # bounds the boolean temporary
        for s in range(0, len(a), step):
            ok = np.isfinite(a[s : s + step]).all(axis=1)
            if not ok.all():
                first = s + int(np.argmin(ok))
                n_bad = int(np.count_nonzero(~np.isfinite(a[first:])))  # rows before ``first`` are finite
                raise InputError(
                    f"{self.path}: split {split} holds {n_bad} NaN/infinite {what} value(s) (first in sample "
                    f"{self.ids(split)[first]}): the processed dataset is damaged; rerun `dgex preprocess`"
                )
        return a

    def ids(self, split: str) -> np.ndarray:
        """The sample ids of ``split``, ``(n_samples,)``."""
        return _strings(self._node(f"splits/{split}/ids"))

    def n_samples(self, split: str) -> int:
        """Number of profiles in ``split``."""
        return int(self._node(f"splits/{split}/X").shape[0])

    def stats(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of ``source`` over landmarks then targets, ``(L+T,)`` each."""
        return self._node(f"stats/{source}/mean")[()], self._node(f"stats/{source}/std")[()]

    def reference(self, name: str = "gene_quantiles") -> np.ndarray:
        """A stored quantile reference (``gene_quantiles`` or ``landmark_quantiles``), ``(n_quantiles,)``."""
        return self._node(f"reference/{name}")[()]

    def has_reference(self, name: str) -> bool:
        """Whether the quantile reference ``name`` is stored."""
        return f"reference/{name}" in self._h5

    def close(self):
        """Close the HDF5 file."""
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
