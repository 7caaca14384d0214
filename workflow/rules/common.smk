# Shared helpers and input functions: everything the rule files compute from config.
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlparse

def _uses_conda():
    try:
        return "conda" in str(workflow.deployment_settings.deployment_method).lower()
    except AttributeError:
        return False


# Jobs run `python -m dgex`: the checkout's src/ goes on PYTHONPATH and the
# interpreter that runs Snakemake (the project venv) first on PATH, so jobs need
# no activated environment. Under --software-deployment-method conda the rule's
# env provides python instead.
SRC = str(Path(workflow.basedir) / "src")
_prefix = f"export PYTHONPATH={shlex.quote(SRC)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "  # braces doubled twice: f-string, then Snakemake
if not _uses_conda():
    _prefix += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(_prefix)

RESULTS = str(Path(config.get("results_dir", "results")) / config["name"])
RESOURCES = config.get("resources_dir", "resources")
SOURCES = ("geo", "g1000", "gtex")
DEMO_FILES = {"geo": "geo.gctx", "g1000": "1000g.tsv.gz", "gtex": "gtex.gctx"}


def out(*parts):
    """A path under this run's results folder."""
    return str(Path(RESULTS, *parts))


def input_cfg(source):
    """Config of one input (geo, g1000, gtex); None when the input is not used."""
    return config["inputs"].get(source)


def input_path(source):
    """Where the workflow finds one input: demo output, a download, or the user's own file."""
    cfg = input_cfg(source)
    if not cfg:
        return None
    kind = cfg["source"]
    if kind == "demo":
        return out("demo", DEMO_FILES[source])
    if kind == "path":
        return cfg["path"]
    name = Path(urlparse(cfg["url"]).path).name or f"{source}.dat"
    if name.endswith(".gctx.gz"):  # GCTX (HDF5) cannot be read compressed: see rule decompress_gctx
        return str(Path(RESOURCES, "unpacked", source, name[: -len(".gz")]))
    return str(Path(RESOURCES, "download", source, name))


def used_sources():
    return [s for s in SOURCES if input_cfg(s)]


def preprocess_inputs(wildcards):
    return {s: input_path(s) for s in used_sources()}


def preprocess_args():
    """Command-line flags of `dgex preprocess` from the genes/preprocess/inputs config."""
    g, p = config["genes"], config["preprocess"]
    geo = input_cfg("geo")
    args = [
        "--landmarks", g["landmarks"], "--targets", g["targets"],
        "--target-seed", g["target_seed"], "--target-parts", g["parts"], "--part-seed", g["part_seed"],
        "--dedup-clusters", p["dedup_clusters"], "--dedup-threshold", p["dedup_threshold"],
        "--standardize", p["standardize"], "--epsilon", p["epsilon"],
        "--va-fraction", p["va_fraction"], "--te-fraction", p["te_fraction"],
        "--split-seed", p["split_seed"], "--seed", p["seed"],
        "--chunk-size", p["chunk_size"], "--memory-mb", p["memory_mb"],
    ]
    if g.get("max_targets"):
        args += ["--max-targets", g["max_targets"]]
    if not p["dedup"]:
        args.append("--no-dedup")
    if geo.get("quantile_normalize"):
        args.append("--geo-quantile-normalize")
    if geo.get("log2"):
        args.append("--geo-log2")
    for s in ("g1000", "gtex"):
        if input_cfg(s):
            args += [f"--{s}", input_path(s), f"--{s}-id-type", input_cfg(s).get("id_type", "ensembl")]
    return " ".join(shlex.quote(str(a)) for a in args)


def all_outputs():
    """Final targets of the workflow (grows as stages are added)."""
    return [out("data", "dataset.h5"), out("data", "dataset.json")]
