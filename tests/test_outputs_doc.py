"""docs/outputs.md documents every output: each file, CSV/TSV column, JSON key and HDF5 dataset the writers produce.

A tiny real pipeline (demo data -> preprocess -> train -> baselines -> aggregate -> tables -> figures ->
interpret -> export -> infer, through the same functions the CLI calls) writes a ``results/<name>/``-like
tree; each file must match a heading of the dictionary, and its columns / keys / datasets must be listed
under that heading. Columns the dictionary types as ``integer`` (``boolean``) must hold only integers
(``True``/``False``): a float leaking into an integer column (``layers 1.0``) fails.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dgex.aggregate import aggregate
from dgex.baselines import run_baseline
from dgex.bundle import export_bundle, prefer_model
from dgex.demo import generate
from dgex.figures import make_figures
from dgex.infer import infer
from dgex.interpret import interpret_s2, interpret_s3
from dgex.preprocess import preprocess
from dgex.tables import make_tables
from dgex.test_sets import prepare_test_set
from dgex.train import train

pytestmark = pytest.mark.slow  # one small real pipeline, about 10-30 s

DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
TINY = {
    "epochs": 2,
    "batch_size": 100,
    "monitor_size": 100,
    "progress": False,
    "device": "cpu",
    "checkpoint_interval": 1e9,
}
INTEGER = re.compile(r"-?\d+")
CELL_SPLIT = re.compile(r"(?<!\\)\|")


# --------------------------------------------------------------------------- reading the dictionary
def _sections() -> list[tuple[str, str]]:
    """``(heading, body)`` of every heading of docs/outputs.md."""
    out, heading, body = [], None, []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            if heading is not None:
                out.append((heading, "\n".join(body)))
            heading, body = line.lstrip("#").strip(), []
        else:
            body.append(line)
    out.append((heading, "\n".join(body)))
    return out


def _pattern(name: str) -> re.Pattern:
    """A documented path or name with ``<placeholders>`` as a regex (a placeholder is one path component)."""
    parts = re.split(r"(<[^>]+>)", name)
    return re.compile("".join("[^/]+" if p.startswith("<") else re.escape(p) for p in parts))


def section(relpath: str) -> str:
    """The body under the one heading that names ``relpath`` (a path relative to results/<name>/)."""
    found = [
        body
        for heading, body in _sections()
        if any(_pattern(n).fullmatch(relpath) for n in re.findall(r"`([^`]+)`", heading))
    ]
    assert len(found) == 1, f"docs/outputs.md has {len(found)} headings for {relpath} (need exactly one)"
    return found[0]


def section_titled(fragment: str) -> str:
    found = [body for heading, body in _sections() if fragment in heading]
    assert len(found) == 1, f"docs/outputs.md has {len(found)} headings containing {fragment!r}"
    return found[0]


def documented(body: str) -> dict[str, str]:
    """``{name: type}`` of the table rows of a section (first cell: backticked names, second: the type)."""
    out = {}
    for line in body.splitlines():
        if not line.startswith("| `") and not line.startswith("| attribute `"):
            continue
        cells = [c.strip() for c in CELL_SPLIT.split(line.strip().strip("|"))]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            out[name] = cells[1]
    return out


def undocumented(names, body: str, patterns: bool = False) -> list[str]:
    """``names`` not in the section's table (``patterns``: placeholders in documented names match too)."""
    doc = documented(body)
    if patterns:
        regexes = [_pattern(n) for n in doc]
        return [n for n in names if not any(r.fullmatch(n) for r in regexes)]
    return [n for n in names if n not in doc]


# --------------------------------------------------------------------------- reading the outputs
def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t" if ".tsv" in path.name else ","))
    return rows[0], rows[1:]


def check_table(path: Path, body: str, extra_columns=()) -> list[str]:
    """Problems of one CSV/TSV against its section: undocumented columns, non-integer / non-boolean cells."""
    header, rows = _read_rows(path)
    problems = [
        f"{path.name}: column {c!r} is not documented" for c in undocumented(header, body) if c not in extra_columns
    ]
    types = documented(body)
    for i, col in enumerate(header):
        kind = types.get(col, "")
        cells = {r[i] for r in rows} - {""}
        if kind.startswith("integer"):
            allowed = {"all"} if "`all`" in kind else set()
            bad = sorted(c for c in cells if not INTEGER.fullmatch(c) and c not in allowed)
            if bad:
                problems.append(f"{path.name}: integer column {col!r} holds {bad[:3]}")
        elif kind.startswith("boolean"):
            bad = sorted(cells - {"True", "False"})
            if bad:
                problems.append(f"{path.name}: boolean column {col!r} holds {bad[:3]}")
    return problems


def check_json(path: Path, body: str) -> list[str]:
    keys = list(json.loads(path.read_text()))
    return [f"{path.name}: key {k!r} is not documented" for k in undocumented(keys, body)]


def _h5_names(path: Path) -> list[str]:
    with h5py.File(path, "r") as h5:
        names = list(h5.attrs)
        h5.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def check_h5(path: Path, body: str) -> list[str]:
    return [f"{path.name}: {n!r} is not documented" for n in undocumented(_h5_names(path), body, patterns=True)]


def _mentioned(keys, body: str, what: str) -> list[str]:
    return [f"{what}: {k!r} is not mentioned" for k in keys if f"`{k}`" not in body]


# --------------------------------------------------------------------------- the pipeline
def _placeholder_figure(fig, out, name):
    """Stands in for dgex.plotting.save_figure: the same file names, without rendering (seconds saved;
    the figures themselves are tested in test_tables.py and test_interpret.py)."""
    from dgex.plotting import pyplot

    pyplot().close(fig)
    for ext in ("png", "pdf"):
        (Path(out) / f"{name}.{ext}").write_bytes(b"")
    return [f"{name}.png", f"{name}.pdf"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A results/<name>/ tree written by the real stages, plus variants (paper reference, incomplete grid)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems: a second thread only adds contention (S2's eigh: 5 s -> 0.7 s)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for module in ("dgex.figures", "dgex.interpret", "dgex.evaluate"):
                mp.setattr(f"{module}.save_figure", _placeholder_figure)
            yield _pipeline(tmp_path_factory.mktemp("outputs"))
    finally:
        torch.set_num_threads(threads)


def _pipeline(root: Path) -> dict:
    res = root / "results"
    demo = res / "demo"
    generate(demo, seed=1, n_geo=300, n_duplicates=12, n_1000g=30, n_gtex=40, n_latent=6, max_targets=24)
    ds = res / "data" / "dataset.h5"
    preprocess(
        geo=demo / "geo.gctx",
        output=ds,
        summary=res / "data" / "dataset.json",
        geo_quantile_normalize=True,  # also writes the optional reference/probe_* datasets
        g1000=demo / "1000g.tsv.gz",
        gtex=demo / "gtex.gctx",
        max_targets=24,
        dedup_clusters=10,
        chunk_size=128,
        progress=False,
    )
    ts = res / "test_sets" / "gtex" / "data.h5"
    prepare_test_set(dataset=ds, source=demo / "gtex.gctx", output=ts, name="gtex")
    dgex_dirs = []
    for part in (0, 1):
        d = res / "runs" / "dgex" / "1x8_d0.1" / f"part{part}"
        train(dataset=ds, output_dir=d, layers=1, units=8, dropout=0.1, part=part, keep_last=part == 0, **TINY)
        dgex_dirs.append(d)
    base_dirs = []
    for method in ("lr", "knn"):
        d = res / "runs" / "baselines" / method
        run_baseline(method, ds, d, progress=False)
        base_dirs.append(d)
    agg = res / "aggregate"
    aggregate(dgex_runs=dgex_dirs, baseline_runs=base_dirs, output_dir=agg)
    make_tables(aggregate=agg, output_dir=res / "tables", n_boot=20)
    make_figures(aggregate=agg, output_dir=res / "figures")
    _score_test_set(root, res, ds, agg, dgex_dirs)
    interpret_s2(dataset=ds, runs=dgex_dirs, output_dir=res / "interpret" / "s2", device="cpu", progress=False)
    interpret_s3(runs=dgex_dirs, output_dir=res / "interpret" / "s3", dataset=ds, progress=False)
    export_bundle(dataset=ds, output=res / "model", grid_aggregate=agg, progress=False)
    export_bundle(dataset=ds, output=res / "model_lr", baseline_run=base_dirs[0], progress=False)
    prefer_model(bundles=[res / "model", res / "model_lr"], output=res / "preferred_model.json")
    # variants: optional columns and keys
    make_tables(aggregate=agg, output_dir=root / "tables_paper", paper_reference=True, n_boot=20)
    aggregate(dgex_runs=dgex_dirs[:1], baseline_runs=base_dirs, output_dir=root / "agg_gap", allow_incomplete=True)
    make_tables(aggregate=root / "agg_gap", output_dir=root / "tables_gap", n_boot=20)
    make_figures(aggregate=root / "agg_gap", output_dir=root / "figures_gap")
    # predictions for the demo's own GEO profiles (probe ids), both formats
    predictions = {}
    for name in ("pred.gctx", "pred.csv"):
        infer(model=res / "model", input=demo / "geo.gctx", output=root / name, device="cpu", progress=False)
        predictions[name] = root / name
    return {"root": root, "res": res, "predictions": predictions}


def _score_test_set(root: Path, res: Path, ds: Path, agg: Path, dgex_dirs: list) -> None:
    """GEO-te as a prepared test set, scored by the D-GEX runs and LR-L2 (its coefficients: least squares)."""
    import shutil

    from dgex.dataset import ProcessedDataset, encode
    from dgex.evaluate import collect_test_sets, score_test_set

    ridge = root / "scoring" / "ridge"  # outside results/: the coefficient files are the baseline stage's
    run_baseline("ridge", ds, ridge, progress=False)
    with ProcessedDataset(ds) as d:
        x, y, fp = d.X("geo-te"), d.Y("geo-te"), d.fingerprint()["sha256"]
        x_tr, y_tr = d.X("geo-tr"), d.Y("geo-tr")
    for sel in ("geo-va", "1000g-va"):
        if not (ridge / f"coefficients_{sel}.npz").exists():
            sol = np.linalg.lstsq(np.hstack([x_tr, np.ones((len(x_tr), 1))]), y_tr, rcond=None)[0]
            np.savez(ridge / f"coefficients_{sel}.npz", weight=sol[:-1], bias=sol[-1], value=np.nan)
    ts = root / "scoring" / "heldout.h5"
    with h5py.File(ts, "w") as h5:
        h5["landmarks"], h5["targets"], h5["sample_ids"] = x, y, encode([f"s{i}" for i in range(len(x))])
        h5.attrs.update({"name": "heldout", "protocol": "own-statistics", "source": "geo-te", "filter": "{}"})
        h5.attrs.update({"dataset_fingerprint": fp, "n_samples": len(x)})
    score_test_set(
        test_set=ts, dataset=ds, aggregate=agg, output_dir=res, dgex_runs=dgex_dirs, baseline_runs=[ridge], n_boot=20
    )
    collect_test_sets(scores=[res / "test_sets" / "heldout" / "score.json"], output=res / "tables" / "test_sets.json")
    shutil.rmtree(root / "scoring")


def test_every_file_written_has_a_heading(pipeline):
    res = pipeline["res"]
    files = sorted(str(p.relative_to(res)) for p in res.rglob("*") if p.is_file())
    assert "runs/dgex/1x8_d0.1/part0/last.ckpt" in files and "model/weights_part1.pt" in files
    missing = []
    for rel in files:
        try:
            section(rel)
        except AssertionError as exc:
            missing.append(str(exc))
    assert not missing, "\n".join(missing)


def test_every_csv_and_tsv_column_is_documented_with_its_type(pipeline):
    res, root = pipeline["res"], pipeline["root"]
    tables = [p for p in res.rglob("*") if p.name.endswith((".csv", ".csv.gz", ".tsv"))]
    assert len(tables) >= 20  # run, baseline, aggregate, table, S2, S3 and bundle tables
    problems = []
    for path in tables:
        problems += check_table(path, section(str(path.relative_to(res))))
    for folder in ("tables_paper", "tables_gap"):  # optional columns: paper reference, incomplete grid
        for path in (root / folder).glob("*.csv"):
            problems += check_table(path, section(f"tables/{path.name}"))
    for path in (root / "agg_gap").glob("*.csv*"):
        problems += check_table(path, section(f"aggregate/{path.name}"))
    assert not problems, "\n".join(problems)


def test_optional_columns_were_exercised(pipeline):
    """The variants really produce the optional columns the dictionary lists (else the check above is idle)."""
    root, res = pipeline["root"], pipeline["res"]
    assert {"paper_mae", "difference"} <= set(_read_rows(root / "tables_paper" / "table1.csv")[0])
    assert {"n_genes", "incomplete"} <= set(_read_rows(root / "tables_gap" / "tableS3.csv")[0])
    # 240 training profiles < 943 landmarks + 2: S2 of the raw inputs is not computed, the hidden layer is
    assert {"status", "reason"} <= set(_read_rows(res / "interpret" / "s2" / "s2_summary.csv")[0])


def test_integer_columns_parse_as_integers(pipeline):
    """runs.csv mixes D-GEX rows with baseline rows that have no architecture: still integers, not 1.0."""
    import pandas as pd

    agg = pipeline["res"] / "aggregate"
    runs = pd.read_csv(agg / "runs.csv", dtype=str, keep_default_na=False)
    dgex = runs[runs["method"] == "D-GEX"]
    for col in ("layers", "units", "part", "n_targets", "best_epoch_geo_va", "epochs", "parameters"):
        assert dgex[col].str.fullmatch(r"\d+").all(), (col, list(dgex[col]))
        assert (runs.loc[runs["method"] != "D-GEX", col] == "").all(), col
    assert sorted(dgex["part"].astype(int)) == [0, 1]
    assert set(dgex["layers"]) == {"1"} and set(dgex["units"]) == {"8"}
    # the values, not only their form: a 1-layer net of 8 units has L*8 + 8 + 8*T + T parameters
    with h5py.File(pipeline["res"] / "data" / "dataset.h5", "r") as h5:
        n_landmarks = len(h5["genes/landmark/ensembl"])
        per_part = np.bincount(h5["genes/target/part"][:])
    parsed = pd.read_csv(agg / "runs.csv", dtype={"part": "Int64", "parameters": "Int64"})
    parsed = parsed[parsed["method"] == "D-GEX"]
    expected = [n_landmarks * 8 + 8 + 8 * per_part[p] + per_part[p] for p in parsed["part"]]
    assert parsed["parameters"].tolist() == expected


def test_json_keys_are_documented(pipeline):
    res, root = pipeline["res"], pipeline["root"]
    files = list(res.rglob("*.json"))
    assert len(files) >= 11
    problems = []
    for path in files:
        problems += check_json(path, section(str(path.relative_to(res))))
    problems += check_json(root / "agg_gap" / "aggregate.json", section("aggregate/aggregate.json"))
    problems += check_json(root / "tables_gap" / "tables.json", section("tables/tables.json"))
    problems += check_json(root / "figures_gap" / "figures.json", section("figures/figures.json"))
    assert "incomplete" in json.loads((root / "tables_gap" / "tables.json").read_text())
    assert not problems, "\n".join(problems)


def test_hdf5_datasets_and_attributes_are_documented(pipeline):
    res = pipeline["res"]
    names = _h5_names(res / "data" / "dataset.h5")
    assert "reference/probe_quantiles" in names and "splits/gtex-te/X" in names
    problems = check_h5(res / "data" / "dataset.h5", section("data/dataset.h5"))
    problems += check_h5(res / "test_sets" / "gtex" / "data.h5", section("test_sets/<set>/data.h5"))
    for name in ("geo.gctx", "gtex.gctx"):  # demo GCTX: every dataset named in its paragraph
        path = res / "demo" / name
        problems += _mentioned([n for n in _h5_names(path) if "/" in n], section(f"demo/{name}"), f"demo/{name}")
    assert not problems, "\n".join(problems)


def test_model_files_contents_are_documented(pipeline):
    res = pipeline["res"]
    problems = []
    with zipfile.ZipFile(res / "model" / "stats.npz") as z:
        keys = [n.removesuffix(".npy") for n in z.namelist()]
    problems += _mentioned(keys, section("model/stats.npz"), "stats.npz")
    blob = torch.load(res / "model" / "weights_part0.pt", weights_only=False)
    problems += _mentioned(blob, section("model/weights_part0.pt"), "weights_part0.pt")
    best = res / "runs" / "dgex" / "1x8_d0.1" / "part0" / "best_geo-va.pt"
    blob = torch.load(best, weights_only=False)
    problems += _mentioned(blob, section(str(best.relative_to(res))), "best_geo-va.pt")
    problems += _mentioned(blob["state_dict"], section(str(best.relative_to(res))).replace("<i>", "0"), "state_dict")
    assert not problems, "\n".join(problems)


def test_prediction_outputs_are_documented(pipeline):
    preds = pipeline["predictions"]
    body = section_titled("GCTX output")
    problems = check_h5(preds["pred.gctx"], body)
    with h5py.File(preds["pred.gctx"], "r") as h5:
        samples = {s.decode() for s in h5["0/META/COL/id"][:]}
    # every column that is not one of the input's samples is a documented metadata column
    problems += check_table(preds["pred.csv"], section_titled("CSV / TSV output"), extra_columns=samples)
    header, _ = _read_rows(preds["pred.csv"])
    assert samples <= set(header)
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the checker itself
def test_the_checker_finds_an_undocumented_column_and_a_float_in_an_integer_column(tmp_path):
    body = section("aggregate/runs.csv")
    good = tmp_path / "runs.csv"
    good.write_text("method,layers,part,dir\nD-GEX,1,0,a\nLR,,,b\n")
    assert check_table(good, body) == []
    bad = tmp_path / "bad.csv"
    bad.write_text("method,layers,part,dir,new_column\nD-GEX,1.0,0.0,a,x\nLR,,,b,y\n")
    problems = check_table(bad, body)
    assert any("'new_column' is not documented" in p for p in problems)
    assert any("'layers' holds ['1.0']" in p for p in problems)
    assert any("'part' holds ['0.0']" in p for p in problems)
    assert undocumented(["splits/geo-tr/X", "splits/geo-tr/Z"], section("data/dataset.h5"), patterns=True) == [
        "splits/geo-tr/Z"
    ]
