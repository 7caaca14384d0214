"""Gene tables: landmark/target maps, probe->gene aggregation, id mapping.

The D-GEX maps (``map_lm.txt``: 943 landmark genes, ``map_tg.txt``: 9,520
target genes) are tab-separated ``symbol, ensembl id, comma-separated
HG-U133A probes`` and ship with the package (GPL-2.0, from uci-cbcl/D-GEX).
A gene's value is the mean of its probes.  Genes are keyed by Ensembl id (one
symbol, IL9R, occurs twice in the target map).
"""

from __future__ import annotations

import contextlib
import gzip
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

from .errors import InputError

BUILTIN = "builtin"


def data_path(name: str) -> Path:
    """Path of a data file shipped inside the package (``dgex/data/<name>``)."""
    return Path(str(resources.files("dgex") / "data" / name))


def read_gene_map(path: str | Path) -> pd.DataFrame:
    """Read a D-GEX gene map: columns ``symbol``, ``ensembl``, ``probes`` (tuple of probe ids)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: gene map not found; use 'builtin' or a path to a map_lm.txt-style file")
    if not path.is_file():
        raise InputError(f"{path}: is a folder, not a gene map; use 'builtin' or a path to a map_lm.txt-style file")
    try:
        with open(path, encoding="utf-8") as fh:  # universal newlines, as any text editor writes them
            lines = fh.read().split("\n")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not a text gene map (byte {exc.start} is not UTF-8 text); pass a tab-separated "
            f"map_lm.txt-style file (symbol, Ensembl id, comma-separated probes) or 'builtin'"
        ) from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[2]:
            raise InputError(
                f"{path}:{n}: expected 3 tab-separated fields (symbol, Ensembl id, comma-separated probes), "
                f"got {len(parts)}; fix the gene map"
            )
        rows.append((parts[0], parts[1], tuple(p for p in parts[2].split(",") if p)))
    df = pd.DataFrame(rows, columns=["symbol", "ensembl", "probes"])
    if df.empty:
        raise InputError(f"{path}: gene map is empty")
    dup = df["ensembl"][df["ensembl"].duplicated()]
    if len(dup):
        raise InputError(f"{path}: {len(dup)} duplicate Ensembl id(s) (e.g. {dup.iloc[0]}); each gene must appear once")
    return df


@lru_cache(maxsize=1)
def probe_annotation() -> pd.DataFrame:
    """HG-U133A probe annotation (``pr_id`` index; ``entrez``, ``symbol``, ``title``); -666 = no gene."""
    with gzip.open(data_path("hg_u133a_probes.tsv.gz"), "rt") as fh:
        df = pd.read_csv(fh, sep="\t", dtype=str, usecols=[0, 1, 2, 3])
    df.columns = ["pr_id", "entrez", "symbol", "title"]
    return df.set_index("pr_id")


def _entrez_for(probes: pd.Series) -> pd.Series:
    """Entrez id of each gene: the most common Entrez id among its probes ('' if none)."""
    ann = probe_annotation()["entrez"]
    exploded = probes.explode()
    ids = ann.reindex(exploded.values).fillna("-666").values
    frame = pd.DataFrame({"gene": exploded.index, "entrez": ids})
    frame = frame[frame["entrez"] != "-666"]
    best = frame.groupby("gene")["entrez"].agg(lambda s: s.value_counts().index[0])
    return best.reindex(probes.index).fillna("")


#: Target spec for the genome-wide model: every HG-U133A probe as its own target.
ALL_PROBES = "u133a-probes"


def all_probe_targets() -> pd.DataFrame:
    """One target per HG-U133A probe (Affymetrix controls excluded), as the paper's L1000 model.

    The ``ensembl`` column holds the probe id here (the unique id of a target);
    ``symbol``/``entrez`` come from the probe annotation ('' where none).
    """
    ann = probe_annotation()
    ann = ann[~ann.index.str.startswith("AFFX")]
    entrez = ann["entrez"].where(ann["entrez"] != "-666", "").fillna("")
    symbol = ann["symbol"].where(ann["entrez"] != "-666", ann.index.to_series()).fillna("")
    return pd.DataFrame(
        {
            "symbol": symbol.values,
            "ensembl": ann.index.values,
            "probes": [(p,) for p in ann.index],
            "entrez": entrez.values,
        }
    )


#: The columns of a gene table people read: a neutral unique id, then each kind of gene id in its own column.
ID_COLUMNS = ["id", "ensembl", "entrez", "symbol", "probe"]


def looks_like_probes(ids: pd.Series) -> bool:
    """Whether every non-empty id is an HG-U133A probe id (the unique ids of the genome-wide model's targets)."""
    ids = ids.astype(str)
    ids = ids[ids != ""]
    return bool(len(ids)) and bool(ids.str.endswith("_at").any()) and bool(ids.isin(probe_annotation().index).all())


def split_gene_ids(table: pd.DataFrame, probe_ids: bool | None = None) -> pd.DataFrame:
    """``table`` keyed by ``ensembl`` (a dataset's gene table, an older bundle's) with ``id`` and ``probe`` added.

    ``id`` takes the unique id; where that is a probe id (``probe_ids``; ``None``:
    when every id is an HG-U133A probe, as the targets of :data:`ALL_PROBES`) it
    moves to ``probe`` and ``ensembl`` is left empty, so that no probe id sits in a
    column named ``ensembl``.  Rows unchanged; a table that has ``id`` already is
    returned as a copy.
    """
    table = table.copy()
    if "id" in table.columns:
        return table
    ids = table["ensembl"].astype(str)
    table.insert(0, "id", ids.values)
    if "probe" not in table.columns:
        table["probe"] = ""
    if probe_ids is None:
        probe_ids = looks_like_probes(ids)
    if probe_ids:
        table["probe"] = ids.values
        table["ensembl"] = ""
    return table


def load_gene_map(spec: str | Path, role: str) -> pd.DataFrame:
    """Load the ``role`` ('landmark' or 'target') map.

    ``spec`` is 'builtin' (D-GEX's map_lm.txt / map_tg.txt), a path to a map in
    that format, or, for targets, :data:`ALL_PROBES` (every U133A probe).
    """
    if str(spec) == ALL_PROBES:
        if role != "target":
            raise InputError(f"'{ALL_PROBES}' can only be used for targets; use 'builtin' or a map file for landmarks")
        return all_probe_targets()
    if str(spec) == BUILTIN:
        spec = data_path("map_lm.txt" if role == "landmark" else "map_tg.txt")
    df = read_gene_map(spec)
    df["entrez"] = _entrez_for(df["probes"]).values
    return df


def select_targets(targets: pd.DataFrame, max_targets: int | None, seed: int) -> pd.DataFrame:
    """A seeded random subset of ``max_targets`` target genes (all when None), in map order."""
    if max_targets is None or max_targets >= len(targets):
        return targets.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(targets), size=int(max_targets), replace=False))
    return targets.iloc[keep].reset_index(drop=True)


def assign_parts(n_genes: int, n_parts: int, seed: int) -> np.ndarray:
    """Seeded random partition of ``n_genes`` into ``n_parts`` near-equal parts; ``(n_genes,)`` part labels."""
    if n_parts < 1 or n_parts > n_genes:
        raise InputError(f"cannot split {n_genes} target genes into {n_parts} parts; use 1..{n_genes} parts")
    perm = np.random.default_rng(seed).permutation(n_genes)
    parts = np.empty(n_genes, dtype=np.int64)
    parts[perm] = np.arange(n_genes) * n_parts // n_genes
    return parts


def aggregation_matrix(genes: pd.DataFrame, probe_ids) -> sparse.csr_matrix:
    """Sparse ``(n_probes, n_genes)`` matrix M with 1/k weights, so ``probe_block @ M`` = gene means.

    ``probe_ids`` lists the probes (columns of the probe block) in order.
    """
    pos = pd.Index(probe_ids)
    exploded = genes["probes"].explode()
    gene_idx = np.repeat(np.arange(len(genes)), genes["probes"].map(len).values)
    probe_idx = pos.get_indexer(exploded.values)
    if (probe_idx < 0).any():
        missing = exploded.values[probe_idx < 0]
        raise InputError(f"{len(missing)} probes missing (e.g. {', '.join(missing[:8])})")
    weights = 1.0 / genes["probes"].map(len).values[gene_idx]
    return sparse.csr_matrix((weights, (probe_idx, gene_idx)), shape=(len(pos), len(genes)), dtype=np.float64)


def required_probes(*gene_tables: pd.DataFrame) -> list[str]:
    """All probes the gene tables use, unique, in first-seen order."""
    seen: dict[str, None] = {}
    for table in gene_tables:
        for probes in table["probes"]:
            for p in probes:
                seen.setdefault(p, None)
    return list(seen)


def strip_version(ids) -> np.ndarray:
    """Drop Ensembl version suffixes: ``ENSG00000152931.6`` -> ``ENSG00000152931``."""
    return np.array([str(i).split(".")[0] if str(i).startswith("ENS") else str(i) for i in ids], dtype=object)


def clean_entrez(v: str) -> str:
    """'5720.0' -> '5720' (pandas may have written Entrez ids as floats); '' stays ''."""
    v = str(v).strip()
    with contextlib.suppress(ValueError):
        if v and float(v).is_integer():
            return str(int(float(v)))
    return v
