# Shared helpers and input functions: everything the rule files compute from config.
import math
import os
import re
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
# The checkout's own dgex (not whichever is installed) says which config key feeds which flag of a job.
sys.path.insert(0, SRC)
from dgex.settings import check_config, config_args

check_config(config)  # after the schema: the rules between settings, as each `dgex` command applies them

_prefix = f"export PYTHONPATH={shlex.quote(SRC)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "  # braces doubled twice: f-string, then Snakemake
if not _uses_conda():
    _prefix += f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH; "
shell.prefix(_prefix)

RESULTS = str(Path(config["results_dir"]) / config["name"])
RESOURCES = config["resources_dir"]
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
    return source_path(source, input_cfg(source))


def source_path(source, cfg):
    """Where the workflow finds the matrix ``cfg`` (an input's or a test set's) known as ``source`` (downloads)."""
    if not cfg:
        return None
    kind = cfg["source"]
    if kind == "demo":
        return out("demo", DEMO_FILES[source])
    if kind == "path":
        return cfg["path"]
    name = download_name(source, cfg["url"])
    if name.endswith(".gctx.gz"):  # GCTX (HDF5) cannot be read compressed: see rule decompress_gctx
        return str(Path(RESOURCES, "unpacked", source, name[: -len(".gz")]))
    return str(Path(RESOURCES, "download", source, name))


def download_name(source, url):
    """File name of a download: the URL's last path segment, which must stay a plain name inside its folder."""
    name = Path(urlparse(url).path).name or f"{source}.dat"
    if name in (".", "..") or name.startswith(".") or "{" in name or "}" in name:
        raise ValueError(
            f"inputs.{source}.url: {url!r} ends in {name!r}, which is not a plain file name and would be "
            f"written outside {RESOURCES}/download/{source}/; give the URL of the file itself"
        )
    return name


def used_sources():
    return [s for s in SOURCES if input_cfg(s)]


# --------------------------------------------------------------------------- #
# test sets (test_sets: in the config)
# --------------------------------------------------------------------------- #
def test_sets():
    return config.get("test_sets") or []


def test_set_cfg(name):
    return next(t for t in test_sets() if t["name"] == name)


def test_set_downloads():
    """{download key: matrix config} of the test sets: test-<set> (landmarks) and test-<set>-targets."""
    keys = {}
    for t in test_sets():
        keys[f"test-{t['name']}"] = t
        if t.get("targets"):
            keys[f"test-{t['name']}-targets"] = t["targets"]
    return keys


def download_cfg(source):
    """Config of the matrix a download key names: an input (geo, g1000, gtex) or a test set's."""
    return input_cfg(source) if source in SOURCES else test_set_downloads()[source]


def download_keys():
    """The `source` wildcard of the acquire rule, every input and test-set matrix (regex-escaped)."""
    return [*SOURCES, *map(re.escape, test_set_downloads())]


def acquire_args(source):
    """Checksum and size flags of `dgex acquire` for one download (a test set's entry read like an input's)."""
    if source in SOURCES:
        return settings_args("acquire", source=source)
    # under a placeholder input name: a test set's name may hold dots, which config keys read as sections
    return shell_args(config_args("acquire", {"inputs": {"test_set": download_cfg(source)}}, source="test_set"))


def test_set_paths(name):
    """(landmarks matrix, targets matrix or None) of a test set."""
    t = test_set_cfg(name)
    return source_path(f"test-{name}", t), source_path(f"test-{name}-targets", t.get("targets"))


def test_set_inputs(wildcards):
    source, targets = test_set_paths(wildcards.test_set)
    files = {"dataset": out("data", "dataset.h5"), "source": source}
    if targets:
        files["targets"] = targets
    return files


def filter_flags(flag, filt):
    """A config filter ({field: [values]}) as the command line's FLAG FIELD=V1,V2 ...; none when empty."""
    if not filt:
        return []
    return [flag, *(f"{k}={','.join(map(str, v))}" for k, v in filt.items())]


def test_set_args(name):
    """Flags of `dgex prepare-test-set` from a test set's entry."""
    t = test_set_cfg(name)
    args = ["--name", name, "--kind", t.get("kind", "gene"), "--protocol", t.get("protocol", "own-statistics")]
    args += ["--id-type", t.get("id_type", "ensembl"), "--source-label", t.get("url") or t.get("path")]
    args += filter_flags("--filter", t.get("filter"))
    _, targets = test_set_paths(name)
    if targets:
        args += ["--targets-source", targets, "--targets-id-type", t["targets"].get("id_type", "ensembl")]
    return shell_args(args)


def test_set_outputs():
    return [out("test_sets", t["name"], "data.h5") for t in test_sets()]


# Config values that name output files are checked at start, before any job is planned.
for _source in used_sources():
    input_path(_source)
for _source, _cfg in test_set_downloads().items():
    source_path(_source, _cfg)


def _non_finite(node, key=""):
    """Config keys holding NaN or Inf (YAML's .nan/.inf pass the schema's minimum/maximum)."""
    if isinstance(node, dict):
        return [k for name, v in node.items() for k in _non_finite(v, f"{key}.{name}" if key else str(name))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _non_finite(v, f"{key}[{i}]")]
    return [key] if isinstance(node, float) and not math.isfinite(node) else []


def _n_targets():
    """Target genes the dataset will have, where the config tells (None for a custom target map)."""
    g = config["genes"]
    if g.get("max_targets"):
        return g["max_targets"]
    return N_TARGETS_ALL if g["targets"] == "builtin" else None


def config_problems():
    """Combinations of settings the schema cannot express; each names its keys and the fix."""
    problems = [f"{k} is {config_value(k)}: give a finite number" for k in _non_finite(config)]
    blocker = next(
        (p for p in reversed([Path(RESULTS), *Path(RESULTS).parents]) if os.path.lexists(p) and not p.is_dir()),
        None,
    )
    if blocker is not None:
        problems.append(
            f"results_dir/name: {blocker} is a file, not a folder, but results go to {RESULTS}/; "
            f"move the file away or set results_dir (or name) to another folder"
        )
    n = _n_targets()
    if n is not None and not config["grid"]["joint"] and config["genes"]["parts"] > n:
        problems.append(
            f"genes.parts is {config['genes']['parts']} but there are only {n} target genes "
            f"(genes.max_targets/genes.targets): use 1..{n} parts"
        )
    names = [t["name"] for t in test_sets()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"test_sets: the name {', '.join(repeated)} is used twice; give every test set its own name")
    missing = {"1000g-va": "g1000", "gtex-te": "gtex"}
    if config["export"]["enabled"] and config["export"]["selection"] == "1000g-va" and not input_cfg("g1000"):
        problems.append(
            "export.selection is 1000g-va but inputs.g1000 is not given, so there is no 1000G-va split to "
            "select by; set export.selection: geo-va or give inputs.g1000"
        )
    not_run = [m for m in export_baselines() if m not in config["baselines"]["methods"]]
    if config["export"]["enabled"] and not_run:
        problems.append(
            f"export.baselines lists {', '.join(not_run)} but baselines.methods does not run "
            f"{'it' if len(not_run) == 1 else 'them'}; add {'it' if len(not_run) == 1 else 'them'} to "
            f"baselines.methods or remove {'it' if len(not_run) == 1 else 'them'} from export.baselines"
        )
    split = config["interpret"]["s2_split"]
    if config["interpret"]["s2"] and split in missing and not input_cfg(missing[split]):
        problems.append(
            f"interpret.s2_split is {split} but inputs.{missing[split]} is not given, so the dataset has no "
            f"{split} split; choose geo-tr, geo-va or geo-te, or give inputs.{missing[split]}"
        )
    return problems


def config_value(key):
    node = config
    for part in key.replace("[", ".[").split("."):
        node = node[int(part[1:-1])] if part.startswith("[") else node[part]
    return node


def preprocess_inputs(wildcards):
    return {s: input_path(s) for s in used_sources()}


def settings_args(command, only=None, skip=(), **keys):
    """Flags of `dgex <command>` for the settings the config sets, quoted: dgex.settings maps keys to flags."""
    return shell_args(config_args(command, config, only=only, skip=skip, **keys))


def preprocess_args():
    """Flags of `dgex preprocess`: its settings, and each RNA-seq input's path before its id type."""
    ids = ("g1000_id_type", "gtex_id_type")
    args = [settings_args("preprocess", skip=ids)]
    for s in ("g1000", "gtex"):
        if input_cfg(s):
            args += [shell_args([f"--{s}", input_path(s)]), settings_args("preprocess", only=(f"{s}_id_type",))]
    for s in used_sources():  # after the paths: a job without a filter keeps its command line
        args.append(shell_args(filter_flags(f"--{s}-filter", input_cfg(s).get("filter"))))
    return " ".join(a for a in args if a)


def shell_args(args):
    """Arguments quoted for a shell command line."""
    return " ".join(shlex.quote(str(a)) for a in args)


def run_dirs(run_files):
    """The folders of run.json inputs, quoted for a shell command line."""
    return shell_args(os.path.dirname(p) for p in run_files)


# --------------------------------------------------------------------------- #
# the training grid
# --------------------------------------------------------------------------- #
N_LANDMARKS = 943
N_TARGETS_ALL = 9520


def fmt_dropout(rate):
    """Dropout as it appears in paths and wildcards: 0, 0.1, 0.25."""
    return f"{float(rate):g}"


def grid_points():
    """(layers, units, dropout) of every grid point, dropout formatted for paths."""
    g = config["grid"]
    return [(l, u, fmt_dropout(d)) for l in g["layers"] for u in g["units"] for d in g["dropout"]]


def target_parts():
    return ["all"] if config["grid"]["joint"] else [str(k) for k in range(config["genes"]["parts"])]


def dgex_run_dir(layers, units, dropout, part):
    return out("runs", "dgex", f"{layers}x{units}_d{dropout}", f"part{part}")


def network_runs(point):
    """run.json of every target part of one grid point (layers, units, dropout)."""
    return [str(Path(dgex_run_dir(*point, p), "run.json")) for p in target_parts()]


def dgex_runs():
    """run.json of every training of the grid."""
    return [f for point in grid_points() for f in network_runs(point)]


def selections():
    """Validation sets the dataset will have to choose models by: GEO-va, and 1000G-va with inputs.g1000."""
    return ["geo-va"] + (["1000g-va"] if input_cfg("g1000") else [])


#: Baseline method -> folder suffix of its linear bundle (results/<name>/model_<suffix>/): the paper's names.
LINEAR_BUNDLES = {"lr": "lr", "ridge": "lr-l2", "lasso": "lr-l1", "knn": "knn-ge"}


def linear_method(suffix):
    """The baseline method of a linear bundle folder suffix (lr-l2 -> ridge)."""
    return {v: k for k, v in LINEAR_BUNDLES.items()}[suffix]


def export_baselines():
    """The baselines exported as linear bundles: export.baselines, or (null) LR-L2 when the grid runs ridge."""
    listed = config["export"]["baselines"]
    if listed is None:
        return ["ridge"] if "ridge" in config["baselines"]["methods"] else []
    return listed


def exported_bundles():
    """bundle.json of every exported model: the chosen D-GEX first, then each export.baselines linear bundle."""
    if not config["export"]["enabled"]:
        return []
    linear = [out(f"model_{LINEAR_BUNDLES[m]}", "bundle.json") for m in export_baselines()]
    return [out("model", "bundle.json")] + linear


def baseline_runs():
    return [out("runs", "baselines", m, "run.json") for m in config["baselines"]["methods"]]


def _n_targets_per_part():
    n = config["genes"].get("max_targets") or N_TARGETS_ALL
    return n if config["grid"]["joint"] else -(-n // config["genes"]["parts"])


def _parameters(layers, units):
    layers, units = int(layers), int(units)
    return N_LANDMARKS * units + (layers - 1) * units * units + units * _n_targets_per_part()


def _size_ratio(wc):
    """Parameter count of this network relative to the smallest of the grid (>= 1)."""
    g = config["grid"]
    return _parameters(wc.layers, wc.units) / _parameters(min(g["layers"]), min(g["units"]))


def network_mem_mb(layers, units):
    # weights, gradients, momentum and the best copy: 4 x 4 bytes per parameter, plus the data
    return int(config["train"]["mem_mb"] + 16 * _parameters(layers, units) / 1e6)


def train_mem_mb(wc):
    return network_mem_mb(wc.layers, wc.units)


def s2_mem_mb():
    # the network plus one float64 Gram matrix (units x units) and cross-product per hidden layer
    layers, units, _ = s2_network()
    return network_mem_mb(layers, units) + int(8 * layers * units * (units + _n_targets_per_part()) / 1e6)


def train_runtime(wc):
    return int(config["train"]["runtime"] * _size_ratio(wc)) + 1


# --------------------------------------------------------------------------- #
# tables, figures, report
# --------------------------------------------------------------------------- #
TABLES = ["table1", "table2", "tableS2", "tableS3", "tableS4", "tableS5", "table_stats"]


def has_rnaseq():
    return bool(input_cfg("g1000") and input_cfg("gtex"))


def table_outputs():
    """Named outputs of rule tables (the report renders the .md files and links the CSVs)."""
    files = {"info": out("tables", "tables.json")}
    for name in TABLES:
        files[f"{name}_md"] = out("tables", f"{name}.md")
        files[f"{name}_csv"] = out("tables", f"{name}.csv")
    return files


def figure_numbers():
    return [1, 2, 3, 4, 5] if has_rnaseq() else [1, 2, 3]


def figure_outputs():
    files = {"info": out("figures", "figures.json")}
    for n in figure_numbers():
        files[f"figure{n}_png"] = out("figures", f"figure{n}.png")
        files[f"figure{n}_pdf"] = out("figures", f"figure{n}.pdf")
    return files


# --------------------------------------------------------------------------- #
# test sets (config test_sets): scored by every model
# --------------------------------------------------------------------------- #
def test_set_names():
    return [t["name"] for t in config.get("test_sets") or []]


def baseline_coefficients():
    """The fitted linear map of every baseline for each selection (scored on the test sets)."""
    return [
        out("runs", "baselines", m, f"coefficients_{sel}.npz")
        for m in config["baselines"]["methods"]
        for sel in selections()
    ]


def test_set_outputs():
    """Every scored test set's table and figure, and the index the report reads (none without test_sets)."""
    names = test_set_names()
    if not names:
        return []
    files = [out("tables", "test_sets.json")]
    for name in names:
        files += [out("tables", f"test_set_{name}.{ext}") for ext in ("csv", "md")]
        files += [out("figures", f"test_set_{name}_scatter.{ext}") for ext in ("png", "pdf")]
    return files


# --------------------------------------------------------------------------- #
# model bundle, interpretation (S2, S3)
# --------------------------------------------------------------------------- #
def _nearest_dropout(target=0.1):
    return min(config["grid"]["dropout"], key=lambda d: (abs(float(d) - target), float(d)))


def _network(key, layers, units):
    """(layers, units, dropout) of the network an analysis uses: configured, or the default of that analysis."""
    net = config["interpret"].get(key)
    if net is None:
        net = {"layers": layers, "units": units, "dropout": _nearest_dropout()}
    point = (int(net["layers"]), int(net["units"]), fmt_dropout(net["dropout"]))
    if point not in grid_points():
        raise ValueError(
            f"interpret.{key} = {point[0]}x{point[1]} dropout {point[2]} is not in the grid; "
            f"choose a network of grid.layers x grid.units x grid.dropout (or null for the default)"
        )
    return point


def s2_network():
    g = config["grid"]
    return _network("s2_network", max(g["layers"]), max(g["units"]))


def s3_network():
    g = config["grid"]
    if config["interpret"].get("s3_network") is None and 1 not in g["layers"]:
        raise ValueError(
            "interpret.s3 maps the weights of a 1-hidden-layer network but grid.layers has no 1; "
            "add 1 to grid.layers or set interpret.s3: false"
        )
    return _network("s3_network", 1, min(g["units"]))


def interpret_outputs():
    files = []
    if config["interpret"]["s2"]:
        files += [out("interpret", "s2", f) for f in ("s2.json", "s2_summary.csv", "figure_s2.png")]
    if config["interpret"]["s3"]:
        files += [out("interpret", "s3", f) for f in ("s3.json", "figure_s3.png")]
    return files


def report_inputs():
    """What the report shows: tables, figures, S2/S3, the data and grid it summarises, external test sets."""
    files = [*table_outputs().values(), out("data", "dataset.json"), out("aggregate", "aggregate.json")]
    if config["report"]["figures"]:
        files += list(figure_outputs().values())
    if config.get("test_sets"):  # tables/test_sets.json: written by the test-set scoring when test sets are configured
        files.append(out("tables", "test_sets.json"))
    return files + interpret_outputs()


def all_outputs():
    """Final targets of the workflow: tables, figures, model bundle, S2/S3, the report (and all they need)."""
    targets = list(table_outputs().values())
    if config["report"]["figures"]:
        targets += list(figure_outputs().values())
    targets += exported_bundles()
    if len(exported_bundles()) > 1:
        targets.append(out("preferred_model.json"))
    return targets + interpret_outputs() + test_set_outputs() + [out("report.html")]


# Checked at start, before any job is planned (after every helper above is defined).
_problems = config_problems()
if _problems:
    raise ValueError("invalid config: " + "; ".join(_problems))
