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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from . import DATASET_FORMAT
from .errors import InputError

#: Evaluation splits in paper order: GEO train/validation/test, 1000G validation, GTEx test.
SPLITS = ("geo-tr", "geo-va", "geo-te", "1000g-va", "gtex-te")
#: Splits every trained model is evaluated on (all but the training split).
EVAL_SPLITS = SPLITS[1:]
#: Validation splits that choose a model: the best epoch of a run, a baseline's hyper-parameter, a grid point.
SELECTIONS = ("geo-va", "1000g-va")
SOURCE_OF = {"geo-tr": "geo", "geo-va": "geo", "geo-te": "geo", "1000g-va": "1000g", "gtex-te": "gtex"}


def _strings(ds) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in ds[()]], dtype=object)


def encode(values) -> np.ndarray:
    return np.array([str(v).encode() for v in values], dtype="S")


@dataclass
class GeneTables:
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
        self.params = json.loads(self.attrs.get("params", "{}"))

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if f"splits/{s}" in self._h5]

    def genes(self) -> GeneTables:
        g = self._h5["genes"]
        lm = pd.DataFrame({k: _strings(g["landmark"][k]) for k in ("ensembl", "symbol", "entrez")})
        tg = pd.DataFrame({k: _strings(g["target"][k]) for k in ("ensembl", "symbol", "entrez")})
        tg["part"] = g["target/part"][()]
        tg["overlap"] = g["target/overlap"][()].astype(bool)
        return GeneTables(lm, tg)

    def has(self, split: str) -> bool:
        return f"splits/{split}" in self._h5

    def X(self, split: str) -> np.ndarray:
        """Landmarks of ``split``: ``(n_samples, n_landmarks)``."""
        return self._h5[f"splits/{split}/X"][()]

    def Y(self, split: str, part: int | None = None) -> np.ndarray:
        """Targets of ``split`` (one part or all): ``(n_samples, n_targets_sel)``."""
        ds = self._h5[f"splits/{split}/Y"]
        if part is None:
            return ds[()]
        sl = self.genes().part_slice(part)
        return ds[:, sl]

    def ids(self, split: str) -> np.ndarray:
        return _strings(self._h5[f"splits/{split}/ids"])

    def n_samples(self, split: str) -> int:
        return int(self._h5[f"splits/{split}/X"].shape[0])

    def stats(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of ``source`` over landmarks then targets, ``(L+T,)`` each."""
        return self._h5[f"stats/{source}/mean"][()], self._h5[f"stats/{source}/std"][()]

    def reference(self, name: str = "gene_quantiles") -> np.ndarray:
        return self._h5[f"reference/{name}"][()]

    def close(self):
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
