"""Incomplete grids: `dgex aggregate` refuses a grid point that lacks target parts unless --allow-incomplete,
and then `dgex tables` / `dgex figures` state the gaps; tables refuse uneven gene counts nobody declared.

Uses the fake grid of test_tables (2 depths x 2 widths x 2 dropout rates x 2 target parts of 12 and 8 genes,
with a processed dataset that holds those parts).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import assert_one_line_error, run_dgex
from dgex.aggregate import aggregate, load_aggregate
from dgex.errors import InputError
from dgex.tables import make_tables
from helpers_dataset import write_dataset_arrays
from test_tables import DROPOUTS, LAYERS, PART_SIZES, UNITS, make_grid

N_GENES = sum(PART_SIZES)


@pytest.fixture
def runs(tmp_path):
    dgex_dirs, base_dirs, raw = make_grid(tmp_path / "runs")
    return {"root": tmp_path, "dgex": dgex_dirs, "base": base_dirs, "raw": raw}


def _point(d):
    """(layers, units, dropout) of a fake run folder ``<L>x<U>_d<dropout>/part<k>``."""
    layers, rest = d.parent.name.split("x")
    units, dropout = rest.split("_d")
    return int(layers), int(units), float(dropout)


def _aggregate_cli(runs, out, *extra):
    return run_dgex(
        "aggregate", "--dgex-runs", *runs["dgex"], "--baseline-runs", *runs["base"], "--output-dir", out, *extra
    )


def test_a_missing_part_folder_is_an_error_naming_the_grid_point_and_part(runs):
    gone = runs["root"] / "runs" / "1x10_d0" / "part1"
    shutil.rmtree(gone)
    runs["dgex"] = [d for d in runs["dgex"] if d.exists()]  # e.g. a shell glob over what is left
    res = _aggregate_cli(runs, runs["root"] / "agg")
    line = assert_one_line_error(res, "1x10 dropout 0 lacks target part 1", "--allow-incomplete")
    assert f"({PART_SIZES[0]} of {N_GENES} genes)" in line
    assert not (runs["root"] / "agg").exists() or not any((runs["root"] / "agg").iterdir())


def test_a_part_missing_from_every_grid_point_is_found_from_the_dataset(runs):
    """Nothing among the runs shows the gap: only the dataset knows there are two parts."""
    kept = [d for d in runs["dgex"] if d.name == "part0"]
    with pytest.raises(InputError, match="8 grid points incomplete") as err:
        aggregate(dgex_runs=kept, baseline_runs=runs["base"], output_dir=runs["root"] / "agg")
    assert "lacks target part 1" in str(err.value)


def test_allow_incomplete_records_the_gaps_and_every_table_states_them(runs):
    # drop part 1 of the grid point that validation would choose for the GEO task (2x20 at dropout 0.25)
    shutil.rmtree(runs["root"] / "runs" / "2x20_d0.25" / "part1")
    # an unfinished part run (no run.json) is left out and counted as missing, too
    (runs["root"] / "runs" / "1x10_d0" / "part0" / "run.json").unlink()
    res = _aggregate_cli(runs, runs["root"] / "agg", "--allow-incomplete")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("incomplete grid point") == 2
    info = json.loads((runs["root"] / "agg" / "aggregate.json").read_text())
    gaps = {(g["layers"], g["units"], g["dropout"]): g for g in info["incomplete"]}
    assert set(gaps) == {(2, 20, 0.25), (1, 10, 0.0)}
    assert gaps[(2, 20, 0.25)]["missing_parts"] == [1] and gaps[(2, 20, 0.25)]["n_genes"] == PART_SIZES[0]
    assert gaps[(1, 10, 0.0)]["missing_parts"] == [0] and gaps[(1, 10, 0.0)]["n_genes"] == PART_SIZES[1]
    assert info["target_parts"] == {"0": PART_SIZES[0], "1": PART_SIZES[1]}

    res = run_dgex("tables", "--aggregate", runs["root"] / "agg", "--output-dir", runs["root"] / "t", "--bootstrap", 20)
    assert res.returncode == 0, res.stderr
    tables = json.loads((runs["root"] / "t" / "tables.json").read_text())
    for name in tables["tables"]:
        md = (runs["root"] / "t" / f"{name}.md").read_text()
        assert "**Incomplete**" in md and "2x20 dropout 0.25 lacks target part 1" in md, name
    # the supplementary tables show every grid point: the incomplete ones carry the mark, with their gene count
    s3 = pd.read_csv(runs["root"] / "t" / "tableS3.csv")
    dg = s3[s3["method"] == "D-GEX"]
    flagged = {(int(r.layers), int(r.units), float(r.dropout)) for r in dg.itertuples() if r.incomplete}
    assert flagged == set(gaps)
    assert set(dg.loc[~dg["incomplete"], "n_genes"]) == {N_GENES}
    assert "| 2×20 |" in (runs["root"] / "t" / "tableS3.md").read_text()
    assert (runs["root"] / "t" / "tableS3.md").read_text().count("†") >= 3  # two cells + the note
    # the choice is made among complete grid points: the oracle is the raw per-gene means without the gaps
    raw = runs["raw"]
    val = raw[(raw["method"] == "D-GEX") & (raw["selected_by"] == "geo-va") & (raw["split"] == "geo-va")]
    means = val.groupby(["layers", "units", "dropout"])["mae"].mean().drop(index=list(gaps))
    best = means.idxmin()
    chosen = tables["chosen"]["geo"]
    assert (chosen["layers"], chosen["units"], chosen["dropout"]) == best
    assert (2, 20, 0.25) not in {(chosen["layers"], chosen["units"], chosen["dropout"])}
    assert tables["incomplete"]["grid_points"] == info["incomplete"]
    # the folders given without a run.json (the deleted one and the unfinished one) are listed as left out
    left_out = [str(runs["root"] / "runs" / p) for p in ("1x10_d0/part0", "2x20_d0.25/part1")]
    assert sorted(info["left_out"]) == sorted(tables["incomplete"]["left_out"]) == left_out
    assert f"left out: {', '.join(info['left_out'])}." in (runs["root"] / "t" / "table1.md").read_text()

    res = run_dgex("figures", "--aggregate", runs["root"] / "agg", "--output-dir", runs["root"] / "f")
    assert res.returncode == 0, res.stderr
    figures = json.loads((runs["root"] / "f" / "figures.json").read_text())
    for name, fig in figures["figures"].items():
        assert "2x20 dropout 0.25 lacks target part 1" in fig["caption"], name


def test_tables_refuse_uneven_gene_counts_that_the_aggregate_does_not_declare(runs):
    shutil.rmtree(runs["root"] / "runs" / "1x20_d0" / "part0")
    runs["dgex"] = [d for d in runs["dgex"] if d.exists()]
    agg = runs["root"] / "agg"
    aggregate(dgex_runs=runs["dgex"], baseline_runs=runs["base"], output_dir=agg, allow_incomplete=True)
    # an aggregate written without the declaration (an older dgex, or edited by hand)
    info = json.loads((agg / "aggregate.json").read_text())
    del info["incomplete"]
    (agg / "aggregate.json").write_text(json.dumps(info))
    res = run_dgex("tables", "--aggregate", agg, "--output-dir", runs["root"] / "t")
    assert_one_line_error(res, "summary.csv", f"between {PART_SIZES[1]} and {N_GENES} genes", "--allow-incomplete")
    assert not (runs["root"] / "t" / "table1.csv").exists()
    res = run_dgex("figures", "--aggregate", agg, "--output-dir", runs["root"] / "f")
    assert_one_line_error(res, "summary.csv", "not comparable")


def test_complete_grids_are_unchanged(runs):
    """A complete grid has no gap: no incomplete marks, no extra columns, every grid point eligible."""
    info = aggregate(dgex_runs=runs["dgex"], baseline_runs=runs["base"], output_dir=runs["root"] / "agg")
    assert info["incomplete"] == [] and info["n_runs"]["dgex"] == len(LAYERS) * len(UNITS) * len(DROPOUTS) * 2
    tables = make_tables(aggregate=runs["root"] / "agg", output_dir=runs["root"] / "t", n_boot=20)
    assert "incomplete" not in tables
    assert "†" not in (runs["root"] / "t" / "tableS3.md").read_text()
    assert list(pd.read_csv(runs["root"] / "t" / "tableS3.csv").columns) == [
        "method",
        "layers",
        "units",
        "dropout",
        "mae_mean",
        "mae_std",
    ]


def test_the_dataset_must_be_found_or_given(runs, tmp_path):
    """Without the dataset, aggregate cannot know how many parts there are: it says so; --dataset fixes it."""
    moved = tmp_path / "elsewhere.h5"
    shutil.move(runs["root"] / "runs" / "ds.h5", moved)
    res = _aggregate_cli(runs, tmp_path / "agg")
    assert_one_line_error(res, "ds.h5", "is not found", "--dataset")
    res = _aggregate_cli(runs, tmp_path / "agg", "--dataset", moved)
    assert res.returncode == 0, res.stderr
    # a dataset whose parts differ from the runs' (here: 10 and 10 genes instead of 12 and 8) is refused
    wrong = write_dataset_arrays(
        tmp_path / "wrong.h5",
        {"geo-tr": (np.zeros((2, 3)), np.zeros((2, N_GENES)))},
        parts=np.sort(np.arange(N_GENES) % 2),
    )
    res = _aggregate_cli(runs, tmp_path / "agg2", "--dataset", wrong)
    assert_one_line_error(res, "targets, but the dataset has parts", "the dataset the runs were trained on")


def test_a_truncated_per_gene_file_is_refused(runs):
    d = runs["dgex"][5]
    pg = pd.read_csv(d / "per_gene.csv")
    pg.iloc[:-3].to_csv(d / "per_gene.csv", index=False)
    res = _aggregate_cli(runs, runs["root"] / "agg")
    assert_one_line_error(res, str(d / "per_gene.csv"), "incomplete")


def test_a_run_on_all_targets_covers_every_part(runs, tmp_path):
    """grid.joint: one run (part null) per grid point is complete; mixing it with part runs is refused."""
    joint = tmp_path / "joint" / "1x10_d0" / "partall"
    joint.mkdir(parents=True)
    frames = [pd.read_csv(runs["root"] / "runs" / "1x10_d0" / f"part{p}" / "per_gene.csv") for p in (0, 1)]
    pd.concat(frames).to_csv(joint / "per_gene.csv", index=False)
    shutil.copy(runs["root"] / "runs" / "1x10_d0" / "part0" / "history.csv", joint / "history.csv")
    info = json.loads((runs["root"] / "runs" / "1x10_d0" / "part0" / "run.json").read_text())
    info["config"]["part"] = None
    info["n_targets"] = N_GENES
    (joint / "run.json").write_text(json.dumps(info))
    out = aggregate(dgex_runs=[joint], baseline_runs=[], output_dir=tmp_path / "agg")
    assert out["incomplete"] == [] and load_aggregate(tmp_path / "agg")["summary"]["n_genes"].eq(N_GENES).all()
    with pytest.raises(InputError, match="a run on all targets and part runs"):
        aggregate(dgex_runs=[joint, runs["dgex"][0]], baseline_runs=[], output_dir=tmp_path / "agg2")
