"""Expression-matrix input/output (GCTX, GCT, TSV) and atomic file writes.

Orientation convention used everywhere in dgex: arrays are
``(n_samples, n_genes)``.  This is also how GCTX stores its matrix on disk
(HDF5 dataset ``/0/DATA/0/matrix`` of shape ``(n_columns, n_rows)`` =
``(samples, genes/probes)``), so a block of samples is one contiguous read.

GCTX is read and written with plain h5py: cmapPy's writer breaks on numpy 2
and its parser on pandas 3, so dgex does not depend on it at run time.  The
layout is cmapPy's, and the tests check round trips against cmapPy in both
directions in the pinned environment (numpy<2, pandas<3).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import pandas as pd

from .errors import InputError

MATRIX = "0/DATA/0/matrix"
ROW_META = "0/META/ROW"
COL_META = "0/META/COL"
GCTX_VERSION = "GCTX1.0"


# --------------------------------------------------------------------------- #
# atomic writes
# --------------------------------------------------------------------------- #
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed, so a crashed or killed
    writer never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):  # numpy integers, floats and bools
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def check_unique(ids: Sequence[str], what: str, path) -> None:
    """Raise :class:`InputError` if ``ids`` has duplicates."""
    ids = pd.Index(ids)
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()
        raise InputError(
            f"{path}: {len(dup)} duplicate {what} id(s), e.g. {', '.join(map(str, dup[:5]))}; "
            f"make the {what} ids unique (e.g. average or drop repeated {what}s) and retry"
        )


def check_finite(block: np.ndarray, sample_ids: Sequence[str], path) -> None:
    """Raise :class:`InputError` naming the first samples that hold NaN or Inf.

    ``block`` is ``(n_samples, n_genes)``.
    """
    bad_rows = ~np.isfinite(block).all(axis=1)
    if bad_rows.any():
        names = [str(sample_ids[i]) for i in np.flatnonzero(bad_rows)[:5]]
        raise InputError(
            f"{path}: {int(bad_rows.sum())} sample(s) contain NaN or Inf values "
            f"(e.g. {', '.join(names)}); remove or impute those samples and retry"
        )


#: Log2 expression stays below this; larger values mean a linear scale.
MAX_LOG2_VALUE = 30.0


def check_scale(block: np.ndarray, path, linear_fix: str, ratio_fix: str) -> None:
    """Reject values that are clearly not log2 expression; ``block`` is ``(n_samples, n_genes)``.

    ``linear_fix`` / ``ratio_fix``: how the caller's user fixes linear-scale
    values / z-scores or log ratios (the message's last clause).
    """
    top = float(np.nanmax(block)) if block.size else 0.0
    if top > MAX_LOG2_VALUE:
        raise InputError(
            f"{path}: values up to {top:.4g} look linear-scale, expected log2 expression (~2-16); {linear_fix}"
        )
    med = float(np.nanmedian(block)) if block.size else 1.0
    if med < 1.0:
        raise InputError(
            f"{path}: median value {med:.3g} looks like z-scores or log ratios, expected log2 "
            f"expression (~2-16); {ratio_fix}"
        )


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


# --------------------------------------------------------------------------- #
# readers
# --------------------------------------------------------------------------- #
class Matrix:
    """Common read interface of an expression matrix of genes x samples.

    ``row_ids`` are genes/probes, ``col_ids`` are samples.  Data are always
    returned as float32 arrays ``(n_samples, n_genes)``.
    """

    path: Path
    row_ids: np.ndarray
    col_ids: np.ndarray

    @property
    def n_rows(self) -> int:
        return len(self.row_ids)

    @property
    def n_cols(self) -> int:
        return len(self.col_ids)

    def row_positions(self, ids: Sequence[str], what: str = "row") -> np.ndarray:
        """Positions of ``ids`` among the rows; error listing the ones that are missing."""
        index = pd.Index(self.row_ids)
        pos = index.get_indexer(pd.Index(ids))
        missing = [str(i) for i, p in zip(ids, pos) if p < 0]
        if missing:
            raise InputError(
                f"{self.path}: {len(missing)} of {len(ids)} {what} ids are missing "
                f"(e.g. {', '.join(missing[:8])}); use an input that contains them "
                f"(HG-U133A probe ids for GEO input) or check the id type"
            )
        return pos

    def read(self, rows: np.ndarray | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples ``start:stop`` (all by default) of the selected rows, ``(n_samples, n_rows_sel)``."""
        raise NotImplementedError

    def iter_samples(self, chunk_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, block)`` with ``block`` of shape ``(stop - start, n_rows_sel)``."""
        chunk_size = max(1, int(chunk_size))
        for start in range(0, self.n_cols, chunk_size):
            stop = min(start + chunk_size, self.n_cols)
            yield start, stop, self.read(rows, start, stop)

    def row_meta(self) -> pd.DataFrame:
        raise NotImplementedError

    def col_meta(self) -> pd.DataFrame:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GCTXReader(Matrix):
    """Lazy GCTX reader: ids and metadata up front, data read in sample blocks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_file(self.path)
        if not h5py.is_hdf5(self.path):
            raise InputError(
                f"{self.path}: not a GCTX file (not HDF5); pass a .gctx file "
                f"(use a .gct/.tsv extension for text matrices)"
            )
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(
                f"{self.path}: corrupt or truncated HDF5 file ({exc}); re-download or regenerate it"
            ) from None
        try:
            for node in (MATRIX, f"{ROW_META}/id", f"{COL_META}/id"):
                if node not in self._h5:
                    raise InputError(
                        f"{self.path}: not a GCTX file (HDF5 node /{node} missing); "
                        f"write it in the CMap GCTX layout (cmapPy write_gctx or dgex.io.write_gctx)"
                    )
            self._data = self._h5[MATRIX]
            self.row_ids = _decode(self._h5[f"{ROW_META}/id"][()])
            self.col_ids = _decode(self._h5[f"{COL_META}/id"][()])
        except InputError:
            self._h5.close()
            raise
        except (OSError, KeyError, ValueError) as exc:
            self._h5.close()
            raise InputError(f"{self.path}: corrupt GCTX file ({exc}); re-download or regenerate it") from None
        shape = self._data.shape
        expected = (len(self.col_ids), len(self.row_ids))
        if shape != expected:
            self._h5.close()
            if shape == expected[::-1]:
                raise InputError(
                    f"{self.path}: matrix is stored in the wrong orientation ({shape[0]} HDF5 rows = genes); "
                    f"GCTX stores samples as HDF5 rows: transpose it and rewrite (dgex.io.write_gctx)"
                )
            raise InputError(
                f"{self.path}: matrix shape {shape} does not match {expected[1]} row ids x "
                f"{expected[0]} column ids; the file is corrupt, regenerate it"
            )
        check_unique(self.row_ids, "row", self.path)
        check_unique(self.col_ids, "column", self.path)

    def read(self, rows=None, start=0, stop=None):
        stop = self.n_cols if stop is None else stop
        try:
            block = self._data[start:stop, :]
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{self.path}: corrupt or truncated GCTX data ({exc}); re-download or regenerate it"
            ) from None
        block = np.asarray(block, dtype=np.float32)
        return block if rows is None else block[:, rows]

    def _meta(self, node: str, ids: np.ndarray) -> pd.DataFrame:
        group = self._h5[node]
        cols = {k: _decode(group[k][()]) for k in group.keys() if k != "id" and group[k].shape == (len(ids),)}
        return pd.DataFrame(cols, index=pd.Index(ids, name="id"))

    def row_meta(self):
        return self._meta(ROW_META, self.row_ids)

    def col_meta(self):
        return self._meta(COL_META, self.col_ids)

    def close(self):
        with contextlib.suppress(Exception):
            self._h5.close()


class InMemoryMatrix(Matrix):
    """A matrix held in memory (read from GCT/TSV, or built in code)."""

    def __init__(self, data: np.ndarray, row_ids, col_ids, row_meta=None, col_meta=None, path="<memory>"):
        self.path = Path(path) if not isinstance(path, Path) else path
        self.data = np.asarray(data, dtype=np.float32)  # (n_samples, n_genes)
        self.row_ids = np.asarray([str(i) for i in row_ids], dtype=object)
        self.col_ids = np.asarray([str(i) for i in col_ids], dtype=object)
        if self.data.shape != (len(self.col_ids), len(self.row_ids)):
            raise InputError(f"{self.path}: data shape {self.data.shape} does not match the ids")
        check_unique(self.row_ids, "row", self.path)
        check_unique(self.col_ids, "column", self.path)
        self._row_meta = row_meta if row_meta is not None else pd.DataFrame(index=pd.Index(self.row_ids, name="id"))
        self._col_meta = col_meta if col_meta is not None else pd.DataFrame(index=pd.Index(self.col_ids, name="id"))

    def read(self, rows=None, start=0, stop=None):
        block = self.data[start:stop]
        return block if rows is None else block[:, rows]

    def row_meta(self):
        return self._row_meta

    def col_meta(self):
        return self._col_meta


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path in your config or command line")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an expression file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file; re-download or regenerate it")


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def read_gct(path: str | os.PathLike) -> InMemoryMatrix:
    """Read a text GCT file (v1.2 or v1.3) into memory."""
    path = Path(path)
    _check_file(path)
    try:
        with _open_text(path) as fh:
            version = fh.readline().strip()
            dims = fh.readline().strip().split("\t")
            if version not in ("#1.2", "#1.3"):
                raise InputError(f"{path}: not a GCT file (first line {version[:20]!r}, expected #1.2 or #1.3)")
            n_row_meta = int(dims[2]) if version == "#1.3" else 1
            n_col_meta = int(dims[3]) if version == "#1.3" else 0
            df = pd.read_csv(fh, sep="\t", header=0, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, gzip.BadGzipFile, ValueError, IndexError) as exc:
        raise InputError(f"{path}: cannot parse GCT file ({exc}); check the file format") from None
    id_col = df.columns[0]
    meta_cols = list(df.columns[1 : 1 + n_row_meta]) if version == "#1.3" else [df.columns[1]]
    sample_cols = list(df.columns[1 + len(meta_cols) :])
    col_meta_rows = df.iloc[:n_col_meta]
    body = df.iloc[n_col_meta:]
    col_meta = pd.DataFrame(
        {r[id_col]: r[sample_cols].values for _, r in col_meta_rows.iterrows()},
        index=pd.Index(sample_cols, name="id"),
    )
    try:
        data = body[sample_cols].replace({"": "nan", "NA": "nan"}).astype(np.float32).to_numpy().T
    except ValueError as exc:
        raise InputError(f"{path}: non-numeric expression values ({exc}); fix the file") from None
    row_meta = body.set_index(id_col)[meta_cols] if version == "#1.3" else None
    return InMemoryMatrix(data, body[id_col].values, sample_cols, row_meta, col_meta, path)


#: Gene annotation columns that may be numeric but are never samples (GEUVADIS, GTEx GCT, ...).
ANNOTATION_COLUMNS = {
    "gene_symbol",
    "symbol",
    "description",
    "name",
    "chr",
    "chrom",
    "chromosome",
    "coord",
    "start",
    "end",
    "stop",
    "strand",
    "length",
    "gene_name",
    "gene_type",
    "entrez",
    "gene_id",
}


def read_tsv(path: str | os.PathLike, id_column: str | int = 0) -> InMemoryMatrix:
    """Read a genes x samples table (TSV/CSV, optionally gzipped).

    The id column is ``id_column``; other non-numeric columns (e.g. GEUVADIS's
    ``Gene_Symbol``, ``Chr``, ``Coord``) become row metadata, numeric columns samples.
    """
    path = Path(path)
    _check_file(path)
    sep = "," if ".csv" in path.suffixes else "\t"
    try:
        df = pd.read_csv(path, sep=sep, low_memory=False)
    except (UnicodeDecodeError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(
            f"{path}: cannot parse table ({exc}); expected a tab-separated genes x samples table"
        ) from None
    id_name = df.columns[id_column] if isinstance(id_column, int) else id_column
    if id_name not in df.columns:
        raise InputError(f"{path}: id column {id_name!r} not found; columns start {list(df.columns[:5])}")
    rest = df.drop(columns=[id_name])
    numeric = [
        c for c in rest.columns if pd.api.types.is_numeric_dtype(rest[c]) and str(c).lower() not in ANNOTATION_COLUMNS
    ]
    meta = [c for c in rest.columns if c not in numeric]
    if not numeric:
        raise InputError(f"{path}: no numeric sample columns found; expected genes as rows and samples as columns")
    data = rest[numeric].to_numpy(dtype=np.float32).T
    row_meta = rest[meta].set_index(df[id_name].astype(str).rename("id"))
    return InMemoryMatrix(data, df[id_name].astype(str).values, numeric, row_meta, None, path)


def open_matrix(path: str | os.PathLike) -> Matrix:
    """Open an expression matrix by extension: ``.gctx`` lazily, ``.gct``/``.tsv``/``.txt``/``.csv`` in memory."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".gctx") or name.endswith(".h5"):
        return GCTXReader(path)
    if name.endswith(".gct"):
        return read_gct(path)
    if name.endswith((".tsv", ".txt", ".csv")):
        return read_tsv(path)
    raise InputError(f"{path}: unknown matrix format; use .gctx, .gct, .tsv, .txt or .csv (optionally .gz)")


# --------------------------------------------------------------------------- #
# writers
# --------------------------------------------------------------------------- #
def _as_hdf5_column(values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in ("U", "O", "S"):
        return np.array([str(v).encode() for v in values], dtype="S")
    return values


def _write_meta(h5: h5py.File, node: str, ids, meta: pd.DataFrame | None) -> None:
    group = h5.require_group(node)
    group.create_dataset("id", data=_as_hdf5_column(ids))
    if meta is not None:
        for name in meta.columns:
            group.create_dataset(str(name), data=_as_hdf5_column(meta[name].values))


class GCTXWriter:
    """Stream a GCTX file sample block by sample block, atomically.

    >>> with GCTXWriter(out, row_ids=genes, col_ids=samples) as w:   # doctest: +SKIP
    ...     for block in blocks:          # each (k, n_genes)
    ...         w.write(block)

    The file appears at ``path`` only after every sample was written.
    """

    def __init__(
        self,
        path,
        row_ids,
        col_ids,
        row_meta: pd.DataFrame | None = None,
        col_meta: pd.DataFrame | None = None,
        compression: str | None = None,
    ):
        self.path = Path(path)
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self.n_rows, self.n_cols = len(row_ids), len(col_ids)
        self._h5 = h5py.File(self._tmp, "w")
        self._h5.attrs["version"] = GCTX_VERSION
        self._h5.attrs["src"] = self.path.name
        chunk_rows = max(1, min(self.n_cols, (1 << 20) // max(1, self.n_rows)))
        self._data = self._h5.create_dataset(
            MATRIX,
            shape=(self.n_cols, self.n_rows),
            dtype=np.float32,
            chunks=(chunk_rows, self.n_rows) if self.n_cols and self.n_rows else None,
            compression=compression,
        )
        _write_meta(self._h5, ROW_META, row_ids, row_meta)
        _write_meta(self._h5, COL_META, col_ids, col_meta)
        self._pos = 0

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` of shape ``(k, n_rows)`` (k samples)."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.n_rows:
            raise ValueError(f"block shape {block.shape} does not match ({'k'}, {self.n_rows})")
        end = self._pos + block.shape[0]
        if end > self.n_cols:
            raise ValueError(f"writing past the declared {self.n_cols} samples")
        self._data[self._pos : end] = block
        self._pos = end

    def close(self, ok: bool = True) -> None:
        self._h5.close()
        if ok and self._pos != self.n_cols:
            ok = False
            err = ValueError(f"only {self._pos} of {self.n_cols} samples were written")
        else:
            err = None
        if ok:
            self._atomic.__exit__(None, None, None)
        else:
            exc = err or RuntimeError("aborted")
            with contextlib.suppress(BaseException):
                self._atomic.__exit__(type(exc), exc, None)
            if err:
                raise err

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)


def write_gctx(path, data: np.ndarray, row_ids, col_ids, row_meta=None, col_meta=None, compression=None) -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as GCTX (rows = genes, columns = samples), atomically."""
    data = np.asarray(data, dtype=np.float32)
    with GCTXWriter(path, row_ids, col_ids, row_meta, col_meta, compression) as w:
        w.write(data)


def write_gct(path, data: np.ndarray, row_ids, col_ids) -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as a GCT v1.2 text file, atomically."""
    data = np.asarray(data)
    df = pd.DataFrame(data.T, index=pd.Index(row_ids, name="Name"), columns=list(col_ids))
    df.insert(0, "Description", list(row_ids))
    with atomic_path(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(f"#1.2\n{data.shape[1]}\t{data.shape[0]}\n")
            df.to_csv(fh, sep="\t", float_format="%.6g")


def write_tsv(path, data: np.ndarray, row_ids, col_ids, row_meta: pd.DataFrame | None = None, id_name="id") -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as a genes x samples TSV (gzipped if the name ends in .gz)."""
    df = pd.DataFrame(np.asarray(data).T, columns=list(col_ids))
    if row_meta is not None:
        df = pd.concat([row_meta.reset_index(drop=True), df], axis=1)
    df.insert(0, id_name, list(row_ids))
    with atomic_path(path) as tmp:
        df.to_csv(
            tmp, sep="\t", index=False, float_format="%.6g", compression="gzip" if str(path).endswith(".gz") else None
        )
