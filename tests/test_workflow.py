"""The Snakemake workflow: config validation, lint, dry runs, and an end-to-end demo run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from dgex.dataset import ProcessedDataset

pytestmark = pytest.mark.slow


def snakemake(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "snakemake", *map(str, args)], cwd=cwd, capture_output=True, text=True)


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


def test_paper_config_dry_run_plans_downloads_and_preprocess(tmp_path):
    res = snakemake("-n", "--configfile", "config/paper.yaml", "--config", f"resources_dir={tmp_path}",
                    f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for rule, count in (("acquire", 3), ("decompress_gctx", 1), ("preprocess", 1)):
        assert any(line.split() == [rule, str(count)] for line in out.splitlines()), out


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
    for log in ("demo_data.log", "preprocess.log"):
        assert (run / "logs" / log).exists()
    # a second run has nothing to do
    res = snakemake("--cores", "2", "--configfile", path, "-n")
    assert "Nothing to be done" in res.stdout + res.stderr
