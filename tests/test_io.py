"""GCTX/GCT/TSV I/O: round trips (also against cmapPy), chunked reads, bad files, atomic writes."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pandas as pd
import pytest

from dgex.errors import InputError
from dgex.io import (
    GCTXReader,
    GCTXWriter,
    atomic_path,
    open_matrix,
    read_gct,
    read_tsv,
    write_gct,
    write_gctx,
    write_tsv,
)


def _matrix(n_samples=7, n_genes=5, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.normal(8, 2, size=(n_samples, n_genes)).astype(np.float32)
    return data, [f"g{i}_at" for i in range(n_genes)], [f"s{i}" for i in range(n_samples)]


def test_gctx_round_trip_with_metadata(tmp_path):
    data, rows, cols = _matrix()
    row_meta = pd.DataFrame({"pr_gene_symbol": [f"SYM{i}" for i in range(5)], "pr_gene_id": np.arange(5)}, index=rows)
    col_meta = pd.DataFrame({"cell": ["A375"] * 7}, index=cols)
    write_gctx(tmp_path / "m.gctx", data, rows, cols, row_meta, col_meta)
    with GCTXReader(tmp_path / "m.gctx") as m:
        assert list(m.row_ids) == rows and list(m.col_ids) == cols
        np.testing.assert_array_equal(m.read(), data)
        np.testing.assert_array_equal(m.read(np.array([4, 1]), 2, 5), data[2:5][:, [4, 1]])
        assert list(m.row_meta()["pr_gene_symbol"]) == list(row_meta["pr_gene_symbol"])
        assert list(m.row_meta()["pr_gene_id"]) == list(range(5))
        assert list(m.col_meta()["cell"]) == ["A375"] * 7


def test_iter_samples_chunks_cover_the_matrix(tmp_path):
    data, rows, cols = _matrix(n_samples=23)
    write_gctx(tmp_path / "m.gctx", data, rows, cols)
    with open_matrix(tmp_path / "m.gctx") as m:
        chunks = list(m.iter_samples(5, rows=np.array([0, 3])))
    assert [(s, e) for s, e, _ in chunks] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    np.testing.assert_array_equal(np.vstack([b for _, _, b in chunks]), data[:, [0, 3]])


def test_streaming_writer_matches_one_shot_writer(tmp_path):
    data, rows, cols = _matrix(n_samples=10)
    with GCTXWriter(tmp_path / "s.gctx", rows, cols) as w:
        for s in range(0, 10, 3):
            w.write(data[s : s + 3])
    with open_matrix(tmp_path / "s.gctx") as m:
        np.testing.assert_array_equal(m.read(), data)


def test_streaming_writer_incomplete_leaves_nothing(tmp_path):
    data, rows, cols = _matrix(n_samples=10)
    with pytest.raises(ValueError, match="only 3 of 10"), GCTXWriter(tmp_path / "s.gctx", rows, cols) as w:
        w.write(data[:3])
    assert list(tmp_path.iterdir()) == []


def test_cmappy_reads_our_gctx(tmp_path):
    from cmapPy.pandasGEXpress.parse import parse  # the pinned oracle: missing or broken fails, never skips

    data, rows, cols = _matrix()
    row_meta = pd.DataFrame({"pr_gene_symbol": [f"SYM{i}" for i in range(5)]}, index=rows)
    write_gctx(tmp_path / "m.gctx", data, rows, cols, row_meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = parse(str(tmp_path / "m.gctx"))
    assert list(g.data_df.index) == rows and list(g.data_df.columns) == cols
    np.testing.assert_array_equal(g.data_df.values.T, data)
    assert list(g.row_metadata_df["pr_gene_symbol"]) == list(row_meta["pr_gene_symbol"])


def test_we_read_cmappy_gctx_and_gct(tmp_path):
    # the pinned oracle (envs/requirements.txt): missing or broken fails, never skips
    from cmapPy.pandasGEXpress.GCToo import GCToo
    from cmapPy.pandasGEXpress.write_gct import write as cm_write_gct
    from cmapPy.pandasGEXpress.write_gctx import write as cm_write_gctx

    data, rows, cols = _matrix()
    row_meta = pd.DataFrame({"pr_gene_symbol": [f"SYM{i}" for i in range(5)]}, index=pd.Index(rows, name="rid"))
    col_meta = pd.DataFrame({"pert": [f"P{i}" for i in range(7)]}, index=pd.Index(cols, name="cid"))
    df = pd.DataFrame(data.T, index=row_meta.index, columns=col_meta.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GCToo(data_df=df, row_metadata_df=row_meta, col_metadata_df=col_meta)
        cm_write_gctx(g, str(tmp_path / "c.gctx"))
        cm_write_gct(g, str(tmp_path / "c.gct"))
    with open_matrix(tmp_path / "c.gctx") as m:
        assert list(m.row_ids) == rows and list(m.col_ids) == cols
        np.testing.assert_array_equal(m.read(), data)
        assert list(m.row_meta()["pr_gene_symbol"]) == list(row_meta["pr_gene_symbol"])
    gct = read_gct(tmp_path / "c.gct")
    assert list(gct.row_ids) == rows and list(gct.col_ids) == cols
    np.testing.assert_allclose(gct.read(), data, rtol=1e-4)
    assert list(gct.col_meta()["pert"]) == list(col_meta["pert"])


def test_gct_and_tsv_round_trip(tmp_path):
    data, rows, cols = _matrix()
    write_gct(tmp_path / "m.gct", data, rows, cols)
    np.testing.assert_allclose(open_matrix(tmp_path / "m.gct").read(), data, rtol=1e-5)
    meta = pd.DataFrame({"Gene_Symbol": [f"S{i}" for i in range(5)], "Chr": ["1"] * 5, "Coord": np.arange(5) * 100})
    write_tsv(tmp_path / "m.tsv.gz", data, rows, cols, meta, id_name="TargetID")
    m = read_tsv(tmp_path / "m.tsv.gz")
    assert list(m.row_ids) == rows and list(m.col_ids) == cols
    assert list(m.row_meta().columns) == ["Gene_Symbol", "Chr", "Coord"]
    np.testing.assert_allclose(m.read(), data, rtol=1e-5)


# ----------------------------------------------------------------- bad files
def test_missing_row_ids_are_listed(tmp_path):
    data, rows, cols = _matrix()
    write_gctx(tmp_path / "m.gctx", data, rows, cols)
    with open_matrix(tmp_path / "m.gctx") as m, pytest.raises(InputError, match=r"2 of 3 .*nope1, nope2"):
        m.row_positions(["g0_at", "nope1", "nope2"])


@pytest.mark.parametrize("content", [b"", b"this is not hdf5 at all\n" * 10])
def test_empty_or_non_hdf5_file(tmp_path, content):
    path = tmp_path / "x.gctx"
    path.write_bytes(content)
    with pytest.raises(InputError, match="empty file|not a GCTX file"):
        open_matrix(path)


def test_truncated_hdf5(tmp_path):
    data, rows, cols = _matrix(n_samples=400, n_genes=300)
    write_gctx(tmp_path / "m.gctx", data, rows, cols)
    raw = (tmp_path / "m.gctx").read_bytes()
    (tmp_path / "t.gctx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="corrupt|truncated|not a GCTX"), open_matrix(tmp_path / "t.gctx") as m:
        m.read()


def test_hdf5_without_gctx_layout(tmp_path):
    with h5py.File(tmp_path / "x.gctx", "w") as h5:
        h5["something"] = np.zeros(3)
    with pytest.raises(InputError, match="not a GCTX file .*0/DATA/0/matrix"):
        open_matrix(tmp_path / "x.gctx")


def test_wrong_orientation(tmp_path):
    data, rows, cols = _matrix()
    with h5py.File(tmp_path / "x.gctx", "w") as h5:
        h5["0/DATA/0/matrix"] = data.T  # genes as HDF5 rows: wrong
        h5["0/META/ROW/id"] = np.array([r.encode() for r in rows])
        h5["0/META/COL/id"] = np.array([c.encode() for c in cols])
    with pytest.raises(InputError, match="wrong orientation"):
        open_matrix(tmp_path / "x.gctx")


def test_duplicate_ids(tmp_path):
    data, rows, cols = _matrix()
    rows[3] = rows[1]
    with h5py.File(tmp_path / "x.gctx", "w") as h5:
        h5["0/DATA/0/matrix"] = data
        h5["0/META/ROW/id"] = np.array([r.encode() for r in rows])
        h5["0/META/COL/id"] = np.array([c.encode() for c in cols])
    with pytest.raises(InputError, match="1 duplicate row id.*g1_at"):
        open_matrix(tmp_path / "x.gctx")


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        open_matrix(tmp_path / "nope.gctx")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown matrix format"):
        open_matrix(tmp_path / "x.xlsx")


def test_atomic_path_removes_temp_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and list(tmp_path.iterdir()) == [target]
