"""The workflow's configs: layering (a user config gets the schema's defaults and nothing of the demo's),
names and paths that would escape results/, the documented defaults, and every shipped config runs
(end to end, reduced) or says in its header why it cannot."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import textwrap

import jsonschema
import pytest
import yaml

from conftest import REPO, SHARED_DATA, run_dgex
from dgex.test_sets import read_test_set
from helpers_workflow import SCHEMA, job_counts, readme_default, readme_rows, snakemake

CONFIGS = sorted(p.name for p in (REPO / "config").glob("*.yaml"))
MISSING = object()


def effective_config(*configfiles, overrides=None) -> dict:
    """The config the Snakefile ends up with (after its layering and validation), read through Snakemake's API."""
    script = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from snakemake.api import SnakemakeApi
        from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
        files, overrides = json.loads(sys.argv[1]), json.loads(sys.argv[2])
        with SnakemakeApi(OutputSettings()) as api:
            wf = api.workflow(
                resource_settings=ResourceSettings(),
                config_settings=ConfigSettings(configfiles=[Path(f) for f in files], config=overrides),
                snakefile=Path("Snakefile"),
                workdir=Path.cwd(),
            )
            print("CONFIG=" + json.dumps(wf._workflow.config))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script, json.dumps(list(map(str, configfiles))), json.dumps(overrides or {})],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("CONFIG=")][-1]
    return json.loads(line[len("CONFIG=") :])


def with_defaults(node, value=MISSING):
    """Oracle: ``value`` with every default the JSON schema ``node`` declares filled in (recursively)."""
    if "$ref" in node:
        node = {**SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]], **{k: v for k, v in node.items() if k != "$ref"}}
    if value is MISSING:
        if "default" not in node:
            return MISSING
        value = copy.deepcopy(node["default"])
    if isinstance(value, dict):
        if "oneOf" in node:  # an optional input: null or an input object
            return with_defaults({"$ref": "#/$defs/input"}, value)
        value = dict(value)
        for key, sub in node.get("properties", {}).items():
            filled = with_defaults(sub, value.get(key, MISSING))
            if filled is not MISSING:
                value[key] = filled
    return value


def write_config(tmp_path, cfg, name="user.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- the documented defaults
def _readme_tables():
    """{section: {key: default cell}} of config/README.md's key tables."""
    sections = {}
    for (section, key), cells in readme_rows().items():
        sections.setdefault(section, {})[key] = cells[0]
    return sections


def test_readme_defaults_are_the_schemas():
    """Every key in config/README.md has its default in the schema, the same value; every schema key is documented."""
    tables = _readme_tables()
    top = SCHEMA["properties"]
    where = {"top": (SCHEMA, [k for k in top if "properties" not in top[k]])}
    for section, node in top.items():
        if "properties" in node:
            where[section] = (node, list(node["properties"]))
    checked = 0
    for section, (node, keys) in where.items():
        rows = tables[section]
        documented = set(rows)
        if section == "inputs":  # the inputs' own keys, then the keys every input has
            keys = keys + list(SCHEMA["$defs"]["input"]["properties"])
        assert documented == set(keys), f"{section}: README {sorted(documented)} vs schema {sorted(keys)}"
        for key, cell in rows.items():
            sub_node = node
            if section == "inputs" and key not in node["properties"]:
                sub_node = SCHEMA["$defs"]["input"]
            spec = sub_node["properties"][key] if section != "top" else node["properties"][key]
            if cell == "(required)":
                assert key in sub_node.get("required", []) and "default" not in spec, (section, key)
            else:
                assert "default" in spec, f"{section}.{key} is documented with default {cell} but the schema has none"
                assert readme_default(cell) == spec["default"], (section, key, cell, spec["default"])
            checked += 1
    assert checked > 60


# --------------------------------------------------------------------------- layering
@pytest.fixture
def minimal(tmp_path):
    """A user config that names only itself and its GEO input (an existing file)."""
    (tmp_path / "my_geo.gctx").touch()
    return {"name": "mine", "inputs": {"geo": {"source": "path", "path": str(tmp_path / "my_geo.gctx")}}}


def test_a_minimal_user_config_gets_the_schema_defaults_and_nothing_of_the_demo(tmp_path, minimal):
    path = write_config(tmp_path, minimal)
    cfg = effective_config(path)
    assert cfg == with_defaults(SCHEMA, minimal)
    assert cfg["genes"]["max_targets"] is None and cfg["inputs"]["g1000"] is None and cfg["inputs"]["gtex"] is None
    assert cfg["grid"]["units"] == [3000, 6000, 9000]  # the paper's, not the demo's [100, 200, 300]
    res = snakemake("-n", "--printshellcmds", "--configfile", path)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert "demo_data" not in counts and counts["train"] == 54
    (preprocess,) = [ln for ln in res.stdout.splitlines() if "dgex preprocess" in ln]
    assert f"--geo {tmp_path / 'my_geo.gctx'}" in preprocess
    assert "--g1000" not in preprocess and "--gtex" not in preprocess and "--max-targets" not in preprocess
    assert "results/demo" not in res.stdout and "results/mine/data/dataset.h5" in res.stdout


def test_partly_given_sections_keep_the_users_values_and_get_defaults_for_the_rest(tmp_path, minimal):
    """Nested objects: the user's keys win, the rest come from the schema; null stays null; inputs get theirs."""
    user = copy.deepcopy(minimal)
    user["inputs"]["g1000"] = {"source": "path", "path": str(tmp_path / "my_geo.gctx"), "id_type": "entrez"}
    user["inputs"]["gtex"] = None
    user["train"] = {"epochs": 5, "lr": None}
    user["interpret"] = {"s2_network": {"layers": 1, "units": 3000, "dropout": 0.1}, "s3": False}
    cfg = effective_config(write_config(tmp_path, user))
    assert cfg == with_defaults(SCHEMA, user)
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["batch_size"] == 200 and cfg["train"]["lr"] is None
    assert cfg["inputs"]["g1000"]["quantile_normalize"] is False and cfg["inputs"]["g1000"]["id_type"] == "entrez"
    assert cfg["interpret"]["s3_network"] is None and cfg["interpret"]["sigmas"] == [4.0, 5.0]


def test_the_demo_config_applies_only_without_configfile(tmp_path):
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert effective_config() == with_defaults(SCHEMA, demo)
    # results_dir in tmp_path: the checkout's own results/demo may already hold a finished demo
    res = snakemake("-n", "--config", f"results_dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert job_counts(res.stdout)["demo_data"] == 1


def test_config_overrides_apply_to_whichever_config_is_used(tmp_path, minimal):
    path = write_config(tmp_path, minimal)
    cfg = effective_config(path, overrides={"name": "other", "genes": {"max_targets": 50}})
    assert cfg["name"] == "other" and cfg["genes"]["max_targets"] == 50 and cfg["genes"]["parts"] == 2
    assert cfg["inputs"] == with_defaults(SCHEMA, minimal)["inputs"]
    demo = effective_config(overrides={"name": "demo2"})
    assert demo["name"] == "demo2" and demo["genes"]["max_targets"] == 1000  # the demo config, overridden
    res = snakemake("-n", "--configfile", path, "--config", "name=other", f"results_dir={tmp_path / 'r'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{tmp_path / 'r' / 'other' / 'data' / 'dataset.h5'}" in res.stdout


# --------------------------------------------------------------------------- outputs stay under results/
BAD_PATHS = [
    ("name", ".."),
    ("name", "../elsewhere"),
    ("name", "a/b"),
    ("name", "/tmp/abs"),
    ("name", ".hidden"),
    ("name", "."),
    ("name", ""),
    ("name", "x" * 101),
    ("name", "run{x}"),
    ("results_dir", "res{name}"),
    ("results_dir", ""),
    ("resources_dir", "{x}"),
]


@pytest.mark.parametrize("key, value", BAD_PATHS)
def test_the_schema_refuses_names_that_would_escape_results(minimal, key, value):
    errors = list(jsonschema.Draft202012Validator(SCHEMA).iter_errors({**minimal, key: value}))
    assert [list(e.path) for e in errors] == [[key]], errors
    for good in ("demo", "my-run_2.b", "A" * 100):
        assert not list(jsonschema.Draft202012Validator(SCHEMA).iter_errors({**minimal, "name": good}))


def test_the_workflow_stops_on_a_name_that_escapes_results(tmp_path, minimal):
    cfg = {**minimal, "results_dir": str(tmp_path / "results"), "name": "../escaped"}
    res = snakemake("-n", "--configfile", write_config(tmp_path, cfg))
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Error validating config file" in out and "instance['name']" in out, out[-2000:]
    assert "plain folder name" in out  # the fix, from the schema's description
    assert not (tmp_path / "escaped").exists()


def test_a_download_name_that_escapes_its_folder_is_refused(tmp_path, minimal):
    cfg = {**minimal, "inputs": {"geo": {"source": "url", "url": "https://example.org/data/.."}}}
    res = snakemake("-n", "--configfile", write_config(tmp_path, cfg), "--config", f"resources_dir={tmp_path}")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "inputs.geo.url" in out and "not a plain file name" in out, out[-2000:]
    ok = {**minimal, "inputs": {"geo": {"source": "url", "url": "https://example.org/data/x.gctx.gz?dl=1"}}}
    res = snakemake("-n", "--printshellcmds", "--configfile", write_config(tmp_path, ok), "--config", "name=u")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resources/unpacked/geo/x.gctx" in res.stdout


# --------------------------------------------------------------------------- every shipped config
def _header(name):
    lines = (REPO / "config" / name).read_text().splitlines()
    return "\n".join(ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])


def _runs_here(name):
    m = re.search(r"^# Runs end to end here: (yes|no)\b(.*)$", _header(name), re.M)
    assert m, f"config/{name}: the header must say 'Runs end to end here: yes|no ...'"
    return m.group(1) == "yes", m.group(2)


RUNNABLE = [c for c in CONFIGS if _runs_here(c)[0]]
NOT_RUNNABLE = [c for c in CONFIGS if not _runs_here(c)[0]]


def test_every_config_says_whether_it_runs_here_and_why_not():
    assert set(RUNNABLE) >= {"config.yaml", "test.yaml", "real.yaml"}
    for name in NOT_RUNNABLE:
        _, why = _runs_here(name)
        assert "download" in why, f"config/{name}: say why it cannot run here (what it downloads)"
        assert all(
            c["source"] == "url" for c in yaml.safe_load((REPO / "config" / name).read_text())["inputs"].values() if c
        )


@pytest.mark.slow
@pytest.mark.parametrize("name", NOT_RUNNABLE)
def test_configs_that_cannot_run_here_dry_run(tmp_path, name):
    res = snakemake(
        "-n", "--configfile", f"config/{name}", "--config", f"resources_dir={tmp_path}", f"results_dir={tmp_path}"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    counts = job_counts(res.stdout)
    assert counts["acquire"] >= 1 and counts["preprocess"] == 1 and counts["train"] >= 1


def _reduced(name, tmp_path):
    """A copy of config/<name> with the same keys and structure, shrunk to run in about a minute."""
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["resources_dir"] = str(tmp_path / "resources")
    if "demo" in cfg:
        cfg["demo"].update(n_geo=300, n_duplicates=12, n_1000g=30, n_gtex=40, n_latent=6)
    cfg["genes"]["max_targets"] = 120
    cfg["preprocess"].update(dedup_clusters=min(cfg["preprocess"].get("dedup_clusters", 10), 10), chunk_size=128)
    grid = cfg["grid"]
    # the deepest network at the widest width (S2's default) and a 1-layer one (S3's), one dropout rate
    grid.update(layers=sorted({1, max(grid["layers"])}), units=[max(grid["units"])], dropout=[0.1])
    cfg["train"].update(epochs=2, monitor_size=100, threads=1, device="cpu")
    cfg.setdefault("baselines", {}).update(methods=["lr", "ridge", "knn"], threads=1)  # test.yaml runs all four
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in RUNNABLE if c != "test.yaml"])
def test_runnable_configs_run_end_to_end(tmp_path, name):
    """Each runnable config (reduced in sizes and epochs) completes: every final output, S2 computed or said why not.

    config/test.yaml runs as shipped in test_workflow.py::test_demo_workflow_end_to_end.
    """
    if name == "real.yaml" and not SHARED_DATA.exists():
        pytest.skip(f"config/real.yaml reads {SHARED_DATA}, which is not present")
    cfg = _reduced(name, tmp_path)
    path = write_config(tmp_path, cfg, name)
    res = snakemake("--cores", "2", "--configfile", path)
    assert res.returncode == 0, res.stderr[-4000:]
    run = tmp_path / "results" / cfg["name"]
    tables = json.loads((run / "tables" / "tables.json").read_text())
    assert "incomplete" not in tables
    for files in tables["tables"].values():
        assert all((run / "tables" / f).stat().st_size > 0 for f in files)
    assert (run / "figures" / "figure1.png").exists() and (run / "model" / "bundle.json").exists()
    for test_set in cfg.get("test_sets", []):  # real.yaml: the held-out study, prepared in the model's space
        prepared = read_test_set(run / "test_sets" / test_set["name"] / "data.h5")
        assert prepared["attrs"]["name"] == test_set["name"] and prepared["attrs"]["n_samples"] > 1
        assert prepared["targets"].shape == (prepared["attrs"]["n_samples"], cfg["genes"]["max_targets"])
    s2 = json.loads((run / "interpret" / "s2" / "s2.json").read_text())
    if s2["status"] != "computed":  # the data are too small for some fit: the outputs say so
        assert s2["reason"] and "not computed" in s2["captions"]["figure_s2"]
    assert (run / "interpret" / "s3" / "s3.json").exists()
    res = snakemake("-n", "--configfile", path)
    assert res.returncode == 0 and "Nothing to be done" in res.stdout + res.stderr
    # the aggregate of this trained grid refuses the grid once a part run is gone
    gone = sorted((run / "runs" / "dgex").glob("*/part1"))[0]
    runs = [p for p in sorted((run / "runs" / "dgex").glob("*/part*")) if p != gone]
    res = run_dgex("aggregate", "--dgex-runs", *runs, "--output-dir", tmp_path / "agg", cwd=REPO)
    assert res.returncode == 2 and f"{gone.parent.name.replace('_d', ' dropout ')} lacks target part 1" in res.stderr
