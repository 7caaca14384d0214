"""Write small processed datasets (the HDF5 layout of :mod:`dgex.dataset`) directly, without preprocess.

``write_dataset_arrays`` writes given split arrays; ``write_toy_dataset``
generates a seeded regression problem (landmarks from a few latent factors,
targets linear -- optionally plus a tanh term -- in the landmarks, the first
targets exact copies of landmarks) and writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from dgex import DATASET_FORMAT, __version__
from dgex.dataset import SOURCE_OF, encode


def write_dataset_arrays(path, splits: dict, overlap=None, parts=None, landmark_ids=None, target_ids=None) -> Path:
    """Write ``splits`` (``name -> (X (n, L), Y (n, T))``) as a processed dataset at ``path``.

    ``overlap`` ``(T,)`` bool marks targets that are landmarks (their ids are
    then the landmark's); ``parts`` ``(T,)`` int, sorted (default all 0).
    """
    path = Path(path)
    X0, Y0 = next(iter(splits.values()))
    L, T = X0.shape[1], Y0.shape[1]
    overlap = np.zeros(T, bool) if overlap is None else np.asarray(overlap, bool)
    parts = np.zeros(T, np.int64) if parts is None else np.asarray(parts, np.int64)
    lm_ens = landmark_ids or [f"ENSG8{i:010d}" for i in range(L)]
    tg_ens = target_ids or [lm_ens[i] if overlap[i] and i < L else f"ENSG9{i:010d}" for i in range(T)]
    lm_sym = [f"LM{i}" for i in range(L)]
    tg_sym = [lm_sym[i] if overlap[i] and i < L else f"TG{i}" for i in range(T)]
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = DATASET_FORMAT
        h5.attrs["dgex_version"] = __version__
        h5.attrs["standardize"] = "all"
        h5.attrs["epsilon"] = 1e-3
        h5.attrs["params"] = json.dumps({"toy": True})
        h5["genes/landmark/ensembl"] = encode(lm_ens)
        h5["genes/landmark/symbol"] = encode(lm_sym)
        h5["genes/landmark/entrez"] = encode([str(1000 + i) for i in range(L)])
        h5["genes/target/ensembl"] = encode(tg_ens)
        h5["genes/target/symbol"] = encode(tg_sym)
        h5["genes/target/entrez"] = encode([str(5000 + i) for i in range(T)])
        h5["genes/target/part"] = parts
        h5["genes/target/overlap"] = overlap
        sources = set()
        for name, (X, Y) in splits.items():
            n = X.shape[0]
            h5[f"splits/{name}/X"] = np.asarray(X, np.float32)
            h5[f"splits/{name}/Y"] = np.asarray(Y, np.float32)
            h5[f"splits/{name}/ids"] = encode([f"{name}-{i}" for i in range(n)])
            sources.add(SOURCE_OF[name])
        for source in sources:
            h5[f"stats/{source}/mean"] = np.full(L + T, 8.0)
            h5[f"stats/{source}/std"] = np.ones(L + T)
        h5["reference/gene_quantiles"] = np.sort(np.random.default_rng(0).normal(8, 2, L + T))
    return path


def write_toy_dataset(
    path,
    n_tr: int = 400,
    n_landmarks: int = 20,
    n_targets: int = 30,
    nonlinear: float = 0.0,
    with_rnaseq: bool = True,
    seed: int = 0,
    noise: float = 0.3,
    n_va: int = 120,
    n_te: int = 120,
    n_overlap: int = 3,
    n_parts: int = 2,
) -> dict:
    """Generate and write a toy dataset; returns ``{"path", "B", "splits"}``.

    ``Y = X @ B + nonlinear * tanh(X @ C) + noise * e`` for non-overlap
    targets; target ``i < n_overlap`` is landmark ``i``.  RNA-seq splits
    (``1000g-va``, ``gtex-te``) come from shifted latent factors and a
    per-gene gain, so the cross-platform task differs from GEO.
    """
    rng = np.random.default_rng(seed)
    L, T, K = n_landmarks, n_targets, max(2, n_landmarks // 3)
    load = rng.normal(size=(K, L))
    B = rng.normal(size=(L, T)) * (rng.random((L, T)) < 0.3) / np.sqrt(L * 0.3)
    C = rng.normal(size=(L, T)) / np.sqrt(L)
    overlap = np.arange(T) < n_overlap

    def draw(n, shift=0.0, gain=None):
        z = rng.normal(size=(n, K)) + shift
        X = z @ load / np.sqrt(K) + 0.5 * rng.normal(size=(n, L))
        if gain is not None:
            X = X * gain
        Y = X @ B + nonlinear * np.tanh(X @ C) + noise * rng.normal(size=(n, T))
        Y[:, overlap] = X[:, :n_overlap]
        return X.astype(np.float32), Y.astype(np.float32)

    sizes = {"geo-tr": n_tr, "geo-va": n_va, "geo-te": n_te}
    splits = {name: draw(n) for name, n in sizes.items()}
    if with_rnaseq:
        gain = rng.uniform(0.7, 1.3, size=L)
        splits["1000g-va"] = draw(n_va, shift=0.3, gain=gain)
        splits["gtex-te"] = draw(n_te, shift=0.3, gain=gain)
    parts = np.sort(np.arange(T) % n_parts)
    write_dataset_arrays(path, splits, overlap=overlap, parts=parts)
    return {"path": Path(path), "B": B, "splits": splits}
