"""The Snakemake workflow: config validation, lint, dry runs, and an end-to-end demo run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import REPO
from dgex.dataset import ProcessedDataset
from helpers_workflow import job_counts, snakemake

pytestmark = pytest.mark.slow


def _config(tmp_path, base="config/test.yaml", **overrides):
    cfg = yaml.safe_load((REPO / base).read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["resources_dir"] = str(tmp_path / "resources")
    for key, value in overrides.items():
        cfg[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_lint_is_clean():
    res = snakemake("--lint")
    assert res.returncode == 0, res.stdout + res.stderr


def test_misspelled_key_is_rejected(tmp_path):
    path, cfg = _config(tmp_path)
    cfg["preprocess"]["dedup_treshold"] = 1.0
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", path)
    assert res.returncode != 0
    assert "dedup_treshold" in res.stderr + res.stdout


def test_out_of_range_value_is_rejected(tmp_path):
    path, cfg = _config(tmp_path)
    cfg["preprocess"]["va_fraction"] = 0.9
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", path)
    assert res.returncode != 0 and "va_fraction" in res.stderr + res.stdout


@pytest.mark.parametrize("profile", [[], ["--workflow-profile", "profiles/slurm"]], ids=["local", "slurm"])
def test_paper_config_dry_run_plans_the_full_grid(tmp_path, profile):
    res = snakemake(
        "-n",
        *profile,
        "--configfile",
        "config/paper.yaml",
        "--config",
        f"resources_dir={tmp_path}",
        f"results_dir={tmp_path}",
    )
    assert res.returncode == 0, res.stderr
    counts = job_counts(res.stdout)
    assert counts["train"] == 54  # 3 depths x 3 widths x 3 dropout rates x 2 target halves
    assert counts["baseline"] == 4
    for rule in ("acquire", "decompress_gctx", "preprocess", "aggregate", "tables", "figures"):
        assert counts[rule] == {"acquire": 3}.get(rule, 1), counts
    # the biggest networks ask for a GPU and more memory/time than the smallest
    assert "wildcards: layers=3, units=9000" in res.stdout
    train_jobs = [b for b in res.stdout.split("\n\n") if "rule train:" in b]
    assert all("gpu=1" in b for b in train_jobs)


def test_demo_workflow_end_to_end(tmp_path):
    path, cfg = _config(tmp_path)
    res = snakemake("--cores", "2", "--configfile", path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "results" / "test"
    summary = json.loads((run / "data" / "dataset.json").read_text())
    assert summary["duplicates_removed"] >= cfg["demo"]["n_duplicates"]
    assert summary["splits"]["1000g-va"] == cfg["demo"]["n_1000g"]
    assert summary["splits"]["gtex-te"] == cfg["demo"]["n_gtex"]
    with ProcessedDataset(run / "data" / "dataset.h5") as ds:
        assert ds.splits == ["geo-tr", "geo-va", "geo-te", "1000g-va", "gtex-te"]
        assert ds.genes().targets.shape[0] == cfg["genes"]["max_targets"]
    for log in ("demo_data.log", "preprocess.log", "aggregate.log", "tables.log", "figures.log"):
        assert (run / "logs" / log).exists()
    _check_tables_and_figures(run, cfg)
    html = (run / "report.html").read_text(encoding="utf-8")  # part of the default target
    assert 'id="table1"' in html and html.count("data:image/png;base64,") == 7  # Figures 1-5, S2, S3
    assert (run / "logs" / "report.log").exists()
    # a second run has nothing to do
    res = snakemake("--cores", "2", "--configfile", path, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr


def _check_tables_and_figures(run, cfg):
    """The tables agree with the per-gene files of the runs they summarise; every figure was drawn."""
    n_grid = len(cfg["grid"]["layers"]) * len(cfg["grid"]["units"]) * len(cfg["grid"]["dropout"])
    per_gene = []
    for d in sorted((run / "runs" / "dgex").glob("*x*_d*")):
        layers, rest = d.name.split("x")
        units, dropout = rest.split("_d")
        frames = [pd.read_csv(p / "per_gene.csv") for p in sorted(d.glob("part*"))]
        assert len(frames) == cfg["genes"]["parts"]
        per_gene.append(pd.concat(frames).assign(layers=int(layers), units=int(units), dropout=float(dropout)))
    per_gene = pd.concat(per_gene)
    assert per_gene.groupby(["layers", "units", "dropout"]).ngroups == n_grid
    tables = json.loads((run / "tables" / "tables.json").read_text())
    for name, val, test in (("table1", "geo-va", "geo-te"), ("table2", "1000g-va", "gtex-te")):
        table = pd.read_csv(run / "tables" / f"{name}.csv")
        dg = table[table["layers"].notna()]
        assert len(dg) == n_grid // len(cfg["grid"]["dropout"])
        for _, r in dg.iterrows():
            sub = per_gene[
                (per_gene["layers"] == r["layers"])
                & (per_gene["units"] == r["units"])
                & (per_gene["dropout"] == r["dropout"])
                & (per_gene["selected_by"] == val)
                & (per_gene["split"] == test)
            ]
            assert len(sub) == cfg["genes"]["max_targets"]
            assert r["mae_mean"] == pytest.approx(sub["mae"].mean(), abs=1e-5)
        # the dropout shown is the one with the lowest validation error over the grid
        val_mae = per_gene[(per_gene["selected_by"] == val) & (per_gene["split"] == val)]
        by_arch = val_mae.groupby(["layers", "units", "dropout"])["mae"].mean()
        ((layers, units),) = dg.loc[dg["selected"], ["layers", "units"]].to_numpy().tolist()
        (dropout,) = set(dg["dropout"])
        # 3-epoch networks can tie to 1e-6: the choice must be a minimum, whichever of the tied ones
        assert by_arch[(layers, units, dropout)] == pytest.approx(by_arch.min(), abs=1e-6)
        task = "geo" if name == "table1" else "cross"
        assert tables["chosen"][task]["dropout"] == dropout
        base = table[table["layers"].isna()]
        assert set(base["method"]) == {"LR", "LR-L1", "LR-L2", "KNN-GE"}
        lr = pd.read_csv(run / "runs" / "baselines" / "lr" / "per_gene.csv")
        lr = lr[(lr["selected_by"] == val) & (lr["split"] == test)]
        assert base.loc[base["method"] == "LR", "mae_mean"].item() == pytest.approx(lr["mae"].mean(), abs=1e-5)
    for n in range(1, 6):
        assert (run / "figures" / f"figure{n}.png").read_bytes()[:4] == b"\x89PNG"
        assert (run / "figures" / f"figure{n}.pdf").read_bytes()[:5] == b"%PDF-"


def test_genome_wide_l1000_config_ends_in_a_bundle(tmp_path):
    """config/l1000.yaml's shape (GEO only, every U133A probe a target, one grid point) on demo inputs."""
    path, cfg = _config(tmp_path, base="config/l1000.yaml")
    cfg["inputs"]["geo"] = {"source": "demo"}
    cfg["demo"] = {"seed": 2, "n_geo": 200, "n_duplicates": 4, "n_1000g": 10, "n_gtex": 10}
    cfg["genes"]["max_targets"] = 60
    cfg["preprocess"].update(dedup_clusters=5, chunk_size=128)
    cfg["grid"] = {"layers": [1], "units": [8], "dropout": [0.1]}
    cfg["train"].update(epochs=2, monitor_size=50, device="cpu", gpu=False, threads=1)
    cfg["baselines"].update(threads=1)
    cfg["interpret"] = {"s2": True, "s3": True}
    path.write_text(yaml.safe_dump(cfg))
    res = snakemake("-n", "--configfile", path)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert counts["train"] == cfg["genes"]["parts"] and "acquire" not in counts and counts["export"] == 1
    res = snakemake("--cores", "2", "--configfile", path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "results" / "l1000"
    with ProcessedDataset(run / "data" / "dataset.h5") as ds:
        targets = ds.genes().targets
        assert ds.splits == ["geo-tr", "geo-va", "geo-te"]
    assert len(targets) == 60 and targets["ensembl"].str.endswith("_at").all()  # one target per probe
    bundle = json.loads((run / "model" / "bundle.json").read_text())
    assert bundle  # written last by `dgex export`
    # the bundle's gene table keeps probe ids in `id` and `probe`, never under `ensembl`
    tg = pd.read_csv(run / "model" / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert tg["id"].tolist() == tg["probe"].tolist() and tg["probe"].str.endswith("_at").all()
    assert (tg["ensembl"] == "").all() and bundle["training_data"]["synthetic"] is True  # demo inputs
    assert (run / "interpret" / "s2" / "figure_s2.png").exists() and (run / "interpret" / "s3" / "s3.json").exists()
