"""One source of truth for the settings: dgex.settings against the CLI, the config schema, config/README.md,
the stage functions' keyword defaults and the workflow's flags; and the checks every entry point shares."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, run_dgex
from dgex import cli, settings
from dgex.errors import ConfigError
from dgex.settings import STAGES, config_args, config_settings, schema_node, settings_of
from helpers_workflow import SCHEMA, readme_default, readme_rows

#: Paths (and the baseline method) each verb needs besides its settings, to parse a command line.
PATHS = {
    "demo-data": ["--output-dir", "o"],
    "acquire": ["--url", "http://127.0.0.1/x", "--output", "x"],
    "preprocess": ["--geo", "g.gctx", "--output", "d.h5"],
    "prepare-test-set": ["--dataset", "d.h5", "--name", "t", "--source", "t.gctx", "--output", "t.h5"],
    "train": ["--dataset", "d.h5", "--output-dir", "o"],
    "baseline": ["lr", "--dataset", "d.h5", "--output-dir", "o"],
    "aggregate": ["--output-dir", "o"],
    "tables": ["--aggregate", "a", "--output-dir", "o"],
    "score-test-set": ["--test-set", "t.h5", "--dataset", "d.h5", "--aggregate", "a", "--output-dir", "o"],
    "interpret s2": ["--dataset", "d.h5", "--runs", "r", "--output-dir", "o"],
    "interpret s3": ["--runs", "r", "--output-dir", "o"],
    "export": ["--dataset", "d.h5", "--runs", "r", "--output", "o"],
    "infer": ["--model", "m", "--input", "i.gctx", "--output", "o.gctx"],
}
#: Values for the required settings (train's grid point).
REQUIRED = {"layers": "2", "units": "8", "dropout": "0.1", "part": "all"}


def argv(command, *extra):
    required = [x for s in settings_of(STAGES[command]) if s.required for x in (s.flag, REQUIRED[s.name])]
    return [*command.split(), *PATHS[command], *required, *extra]


def plain(value):
    return list(value) if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- the same defaults everywhere
def test_every_verb_with_settings_is_covered():
    assert set(STAGES) == set(PATHS)


@pytest.mark.parametrize("command", sorted(STAGES))
def test_cli_defaults_are_the_settings(command):
    """Each option's default (and dest) is its field's default; the parser has an option for every field."""
    args = cli.build_parser().parse_args(argv(command))
    for s in settings_of(STAGES[command]):
        if not s.required:
            assert plain(getattr(args, s.name)) == plain(s.default), (command, s.name)


def _schema_node(key):
    """The schema node at a dotted config key (through $ref and an optional input's oneOf)."""
    node = SCHEMA
    for part in key.format(source="geo").split("."):
        node = node["properties"][part]
        if "oneOf" in node:  # null or an input
            node = next(n for n in node["oneOf"] if "$ref" in n)
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _flow(node):
    return yaml.safe_dump(node, default_flow_style=True, sort_keys=False).strip()


@pytest.mark.parametrize("key", sorted(config_settings()))
def test_the_schema_holds_each_settings_type_range_and_default(key):
    """The schema node of a config key is the one its setting generates (descriptions aside)."""
    owner, *readers = config_settings()[key]
    assert owner.spec.config == key, f"{key}: read by {[s.command for s in readers]} but owned by no setting"
    node = {k: v for k, v in _schema_node(key).items() if k != "description"}
    expected = schema_node(owner)
    assert node == expected, f"{key} in config.schema.yaml must be {_flow(expected)} (dgex.settings), not {_flow(node)}"
    for reader in readers:  # another stage takes the same value: the same rules, or it passes on only some
        if reader.spec.passes is None:
            assert schema_node(reader) == expected, (key, reader.command)
        else:
            assert reader.default == owner.default and all(owner.problem(v) is None for v in reader.spec.passes)


def _readme_rows():
    """{(section, key): (default cell, option cell)} of config/README.md's key tables."""
    return {where: (cells[0], cells[1]) for where, cells in readme_rows().items()}


def _readme_key(config_key):
    section, *_, key = config_key.split(".")
    return section, key


def test_readme_names_the_option_each_config_key_sets():
    """The option column: every `dgex` option a key feeds (from dgex.settings), or 'workflow only'."""
    generated = {}
    for key, users in config_settings().items():
        cell = generated.setdefault(_readme_key(key), [])
        cell += [f"`{s.command} {s.flag}`" for s in users if f"`{s.command} {s.flag}`" not in cell]
    rows = _readme_rows()
    assert set(generated) <= set(rows), sorted(set(generated) - set(rows))
    for where, (_, option) in rows.items():
        assert option == (", ".join(generated[where]) if where in generated else "workflow only"), where
    # resources are the workflow's alone
    for section in ("preprocess", "train", "baselines"):
        for key in ("threads", "mem_mb", "runtime", "gpu"):
            if (section, key) in rows:
                assert rows[(section, key)][1] == "workflow only", (section, key)


def test_readme_defaults_are_the_settings():
    """config/README.md's default of every key a setting owns is the setting's default (and the schema's)."""
    rows = _readme_rows()
    for key, (owner, *_) in config_settings().items():
        cell = rows[_readme_key(key)][0]
        assert readme_default(cell) == plain(owner.default), (key, cell, owner.default)


#: The function each verb calls, as (module, name).
STAGE_FUNCTIONS = {
    "demo-data": ("dgex.demo", "generate"),
    "acquire": ("dgex.acquire", "download"),
    "preprocess": ("dgex.preprocess", "preprocess"),
    "train": ("dgex.train", "train"),
    "baseline": ("dgex.baselines", "run_baseline"),
    "aggregate": ("dgex.aggregate", "aggregate"),
    "tables": ("dgex.tables", "make_tables"),
    "score-test-set": ("dgex.evaluate", "score_test_set"),
    "interpret s2": ("dgex.interpret", "interpret_s2"),
    "interpret s3": ("dgex.interpret", "interpret_s3"),
    "export": ("dgex.bundle", "export_bundle"),
    "infer": ("dgex.infer", "infer"),
    "prepare-test-set": ("dgex.test_sets", "prepare_test_set"),
}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_stage_functions_take_the_settings_with_their_defaults(command):
    """The Python API: the stage function has a keyword for every setting, with the same default."""
    module, name = STAGE_FUNCTIONS[command]
    params = inspect.signature(getattr(__import__(module, fromlist=[name]), name)).parameters
    for s in settings_of(STAGES[command]):
        assert s.name in params, (command, s.name)
        default = params[s.name].default
        if s.required:
            assert default is inspect.Parameter.empty, (command, s.name)
        else:
            assert plain(default) == plain(s.default), (command, s.name, default, s.default)


def test_train_config_fields_are_train_settings():
    """dgex.train.TrainConfig (the recipe a checkpoint records) shares names and defaults with TrainSettings."""
    from dgex.train import TrainConfig

    ours = {s.name: s for s in settings_of(settings.TrainSettings)}
    for f in dataclasses.fields(TrainConfig):
        if f.name == "eval_batch_size":  # not a user setting
            continue
        assert f.name in ours, f.name
        default = None if f.default is dataclasses.MISSING else f.default
        assert default == (None if ours[f.name].required else ours[f.name].default), f.name


def test_value_sets_match_the_package():
    # dgex.settings keeps its own copies so that `dgex --help` and the Snakefile do not import numpy/h5py/torch
    from dgex import baselines, dataset, genes, infer, interpret
    from dgex.training import plan

    assert settings.SPLITS == dataset.SPLITS and settings.SELECTIONS == dataset.SELECTIONS
    assert settings.ID_TYPES == infer.ID_TYPES and settings.FORMATS == infer.FORMATS
    # train takes PRECISIONS from settings; the optimisers are the training plan's
    assert settings.OPTIMIZERS == plan.OPTIMIZERS
    assert settings.SCOPES == interpret.SCOPES
    assert genes.ALL_PROBES in settings.DemoSettings.__dataclass_fields__["targets"].metadata["spec"].choices
    assert set(SCHEMA["properties"]["baselines"]["properties"]["methods"]["items"]["enum"]) == set(baselines.METHODS)


# --------------------------------------------------------------------------- one set of checks
#: (command, flag, bad value, good value): ranges as the stages need them, written out here as the oracle.
BAD_AND_GOOD = [
    ("demo-data", "--n-geo", "1", "2"),
    ("demo-data", "--n-1000g", "1", "2"),
    ("demo-data", "--noise", "0", "0.01"),
    ("demo-data", "--seed", "-1", str(2**32 - 1)),
    ("demo-data", "--target-seed", str(2**32), "0"),
    ("acquire", "--timeout", "0", "0.5"),
    ("acquire", "--size", "0", "1"),
    ("acquire", "--sha256", "xyz", "0" * 64),
    ("preprocess", "--dedup-threshold", "0", "1e-9"),
    ("preprocess", "--dedup-threshold", "nan", "2"),
    ("preprocess", "--epsilon", "inf", "1"),
    ("preprocess", "--va-fraction", "1", "0.89"),  # 0.89: with --te-fraction 0.1 the sum stays < 1
    ("preprocess", "--max-targets", "1", "2"),
    ("preprocess", "--memory-mb", "0", "1"),
    ("preprocess", "--split-seed", "-1", "0"),
    ("train", "--dropout", "1", "0"),
    ("train", "--lr-decay", "1.01", "1"),
    ("train", "--lr-decay", "0", "0.5"),
    ("train", "--momentum", "1", "0.99"),
    ("train", "--lr", "0", "1e-9"),
    ("train", "--weight-decay", "-0.1", "0"),
    ("train", "--checkpoint-interval", "-1", "0"),
    ("train", "--device", "tpu", "cuda:3"),
    ("train", "--part", "-1", "0"),
    ("interpret s2", "--max-samples", "1", "2"),
    ("interpret s2", "--batch-size", "0", "1"),
    ("interpret s3", "--sigmas", "nan", "0.5"),
    ("interpret s3", "--map-size", "0", "1"),
    ("tables", "--bootstrap", "0", "1"),
    ("infer", "--chunk-size", "0", "1"),
    ("infer", "--device", "gpu", "auto"),
]


def _field(command, flag):
    return next(s for s in settings_of(STAGES[command]) if s.flag == flag)


@pytest.mark.parametrize("command, flag, bad, good", BAD_AND_GOOD)
def test_the_cli_and_the_settings_refuse_the_same_values(command, flag, bad, good, capsys):
    parser = cli.build_parser()
    s = _field(command, flag)
    extra = [good, good] if s.spec.nargs == 2 else [good]
    args = parser.parse_args(argv(command, flag, *extra))
    value = getattr(args, s.name)
    STAGES[command].check({**REQUIRED_VALUES, s.name: value})  # accepted by the dataclass too
    with pytest.raises(SystemExit):
        parser.parse_args(argv(command, flag, bad))
    assert f"argument {flag}: must be" in capsys.readouterr().err
    bad_value = s.spec.parse(bad) if s.spec.parse else s.base(bad)
    with pytest.raises(ConfigError, match=re.escape(flag) + " must be"):
        STAGES[command].check({**REQUIRED_VALUES, s.name: [bad_value] if s.is_list else bad_value})


REQUIRED_VALUES = {"layers": 2, "units": 8, "dropout": 0.1, "part": None}


def test_every_float_setting_refuses_nan_and_inf():
    for cls in STAGES.values():
        for s in settings_of(cls):
            if s.base is float:
                for v in (math.nan, math.inf, -math.inf):
                    value = [v] * (2 if s.spec.nargs == 2 else 1) if s.is_list else v
                    with pytest.raises(ConfigError, match="finite"):
                        cls.check({**REQUIRED_VALUES, s.name: value})


def test_python_api_gets_the_same_checks(tmp_path):
    """A stage function refuses a bad setting before it reads or writes anything."""
    from dgex.bundle import export_bundle
    from dgex.demo import generate
    from dgex.infer import infer
    from dgex.interpret import interpret_s2, interpret_s3
    from dgex.preprocess import preprocess
    from dgex.tables import make_tables

    out = tmp_path / "out"
    calls = [
        (lambda: generate(out, n_geo=20, n_duplicates=2, noise=math.nan), "--noise must be a finite number"),
        (lambda: preprocess(geo="nope.gctx", output=out / "d.h5", epsilon=0), "--epsilon must be > 0"),
        (lambda: preprocess(geo="nope.gctx", output=out / "d.h5", split_seed=2**32), "--split-seed must be in"),
        (lambda: interpret_s2(dataset="d.h5", runs=["r"], output_dir=out, max_samples=1), "--max-samples"),
        (lambda: interpret_s3(runs=["r"], output_dir=out, sigmas=(4.0, math.inf)), "--sigmas must be a finite"),
        (lambda: make_tables(aggregate="a", output_dir=out, n_boot=0), "--bootstrap must be >= 1"),
        (lambda: export_bundle(dataset="d.h5", output=out, runs=["r"], selection="geo-te"), "--selection must be"),
        (lambda: infer(model="m", input="i.gctx", output=out / "o.gctx", chunk_size=0), "--chunk-size must be"),
    ]
    for call, message in calls:
        with pytest.raises(ConfigError, match=re.escape(message)):
            call()
    assert not out.exists()


def test_a_bad_value_is_one_error_line_from_the_command_line(tmp_path):
    res = run_dgex("preprocess", "--geo", "g.gctx", "--output", tmp_path / "d.h5", "--epsilon", "nan")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and lines[-1].startswith("dgex preprocess: error: argument --epsilon: must be")
    assert "Traceback" not in res.stderr and not (tmp_path / "d.h5").exists()


# --------------------------------------------------------------------------- the workflow's flags
def _non_default(s):
    """A config value for setting ``s`` that differs from its default and is valid for it."""
    if s.spec.passes:
        return s.spec.passes[0]
    if s.spec.choices:
        return next(c for c in s.spec.choices if c != s.default)
    if s.base is bool:
        return not s.default
    if s.is_list:
        return [7.5, 8.0]
    if s.base is str:
        return "cuda:1" if s.spec.pattern == settings.DEVICE_PATTERN else ("a" * 64 if s.spec.pattern else "x/y.txt")
    lo = s.spec.min if s.spec.min is not None else 0
    hi = s.spec.max if s.spec.max is not None else lo + 10
    value = lo + 0.3 * (hi - lo) if s.base is float else int(lo) + 3
    assert value != s.default
    return value


def _config_with(settings_list):
    config = {"inputs": {"geo": {}, "g1000": {}, "gtex": {}}}
    for s in settings_list:
        *sections, leaf = s.key.format(source="geo").split(".")
        node = config
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = _non_default(s)
    return config


@pytest.mark.parametrize("command", sorted(c for c in STAGES if any(s.key for s in settings_of(STAGES[c]))))
def test_config_values_reach_the_command_line(command):
    """config_args emits each config-set value under the flag the CLI parses back into that setting."""
    users = [s for s in settings_of(STAGES[command]) if s.key]
    config = _config_with(users)
    flags = config_args(command, config, source="geo")
    args = cli.build_parser().parse_args(argv(command, *flags))
    for s in users:
        assert plain(getattr(args, s.name)) == _non_default(s), (command, s.name, flags)


def test_config_args_leave_out_what_the_config_does_not_set():
    base = {
        "inputs": {"geo": {"source": "demo"}, "g1000": None},
        "genes": {"max_targets": None},
        "preprocess": {},
        "train": {"lr": None},
    }
    pre = config_args("preprocess", base)
    # a null value, an input that is not used and an absent section give no flag; a left-out key the default
    assert "--max-targets" not in pre and "--g1000-id-type" not in pre and "--gtex-id-type" not in pre
    assert pre[pre.index("--epsilon") + 1] == "0.001" and "--no-dedup" not in pre
    assert "--geo-quantile-normalize" not in pre and "--landmarks" in pre
    assert config_args("preprocess", {**base, "genes": None})[:2] == ["--dedup-clusters", "100"]
    assert "--lr" not in config_args("train", base)
    demo = config_args("demo-data", {"genes": {"targets": "my/targets.txt"}})
    assert "--targets" not in demo  # only u133a-probes reaches demo-data; a path is preprocess's alone
    assert config_args("demo-data", {"genes": {"targets": "u133a-probes"}, "demo": {}})[-2:] == [
        "--targets",
        "u133a-probes",
    ]


@pytest.mark.parametrize(
    "command, config, key",
    [
        ("train", {"train": {"momentum": 1.5}}, "train.momentum"),
        ("train", {"train": {"epochs": "many"}}, "train.epochs"),
        ("preprocess", {"preprocess": {"epsilon": math.nan}}, "preprocess.epsilon"),
        ("acquire", {"inputs": {"gtex": {"sha256": "abc"}}}, "inputs.gtex.sha256"),
        ("interpret s3", {"interpret": {"sigmas": []}}, "interpret.sigmas"),
    ],
)
def test_config_args_refuse_a_value_the_setting_refuses(command, config, key):
    """The workflow's flags go through the same checks as the command line: a bad value names its config key."""
    with pytest.raises(ConfigError, match=re.escape(f"config key {key} must be")):
        config_args(command, config, source="gtex")


def test_settings_that_are_valid_alone_are_checked_together(tmp_path):
    """GEO validation + test fractions leave profiles to train on: the stage, the CLI and the workflow refuse the same."""
    from dgex.preprocess import preprocess

    out = tmp_path / "d.h5"
    with pytest.raises(ConfigError, match="--va-fraction and --te-fraction must add up to less than 1"):
        preprocess(geo="nope.gctx", output=out, va_fraction=0.6, te_fraction=0.4)
    settings.PreprocessSettings(va_fraction=0.6, te_fraction=0.39)  # just below: accepted
    res = run_dgex("preprocess", "--geo", "g.gctx", "--output", out, "--va-fraction", "0.5", "--te-fraction", "0.5")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("dgex: error: --va-fraction and")
    assert not out.exists()
    with pytest.raises(ConfigError, match=re.escape("config preprocess.va_fraction and preprocess.te_fraction must")):
        settings.check_config({"preprocess": {"va_fraction": 0.9}})  # te_fraction's default 0.1 makes 1.0


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_the_shipped_configs_pass_check_config(name):
    settings.check_config(yaml.safe_load((REPO / "config" / name).read_text()))


def test_check_config_names_a_bad_key_of_any_input():
    with pytest.raises(ConfigError, match=re.escape("config key inputs.g1000.id_type must be one of")):
        settings.check_config({"inputs": {"geo": {}, "g1000": {"id_type": "refseq"}}})


def test_the_parser_and_the_settings_need_only_the_standard_library():
    """`dgex --help` stays fast and the Snakefile imports dgex.settings: neither pulls in the scientific stack."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'src')!r}); import dgex.cli, dgex.settings; "
        "dgex.cli.build_parser(); "
        "print(sorted(m for m in ('numpy', 'pandas', 'torch', 'h5py', 'scipy', 'yaml') if m in sys.modules))"
    )
    res = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=False
    )  # -S: no site-packages
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr + res.stdout
