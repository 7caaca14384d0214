"""Every ``dgex`` command's settings in one place: one dataclass per stage.

A field is one setting: its Python keyword, type, default, allowed values,
help text, command-line flag and, where the workflow sets it, the config key
it comes from.  Everything else is derived from these fields:

* :mod:`dgex.cli` builds each verb's options (type, default, choices, help);
* a stage function validates its keyword arguments with :meth:`Settings.check`,
  so the Python API gets the command line's checks;
* the workflow turns its config into a job's flags with :func:`config_args`
  (``workflow/rules/common.smk``);
* ``tests/test_settings.py`` holds ``workflow/schemas/config.schema.yaml``
  (type, range, default of every key a setting reads), ``config/README.md``
  (defaults and the option each key sets) and the stage functions' keyword
  defaults equal to these fields.

Paths (inputs and outputs) are not settings: each verb declares them itself.
Config keys no setting reads (job resources, the grid, which inputs and jobs)
belong to the workflow alone.

Foundations layer: the standard library only, so that ``dgex --help`` stays fast
and the Snakefile can import it without the scientific stack.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, ClassVar

from .errors import ConfigError

# Value sets shared with the stage modules (tests/test_settings.py holds them equal); kept here so that
# `dgex --help` and the Snakefile need not import numpy, h5py or torch.
ID_TYPES = ("ensembl", "entrez", "symbol", "probe")  # dgex.infer.ID_TYPES
SPLITS = ("geo-tr", "geo-va", "geo-te", "1000g-va", "gtex-te")  # dgex.dataset.SPLITS
SELECTIONS = ("geo-va", "1000g-va")  # dgex.dataset.SELECTIONS
SOURCES = ("geo", "g1000", "gtex")  # the workflow's inputs (config key inputs.<source>)
PRECISIONS = ("32", "tf32", "bf16-mixed")  # the one definition (dgex.train uses it)
OPTIMIZERS = ("sgd", "adamw")  # as dgex.training.plan.OPTIMIZERS (pinned by a test)
SCOPES = ("unit", "matrix")  # dgex.interpret.SCOPES
FORMATS = ("gctx", "csv", "tsv", "h5ad")  # dgex.infer.FORMATS
#: Default criterion of infer's well_inferred flag (README, "Which inferred genes to trust").
WELL_INFERRED = "r_geo_te>=0.5"
#: Seeds seed numpy and torch generators: integers in [0, 2**32).
MAX_SEED = 2**32 - 1
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"


# --------------------------------------------------------------------------- #
# one setting
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class Spec:
    """What a field's annotation and default do not say (see :func:`setting`)."""

    help: str
    flag: str | None = None
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    choices: tuple | None = None
    open_choices: bool = False
    pattern: str | None = None
    pattern_text: str | None = None
    nargs: str | int | None = None
    metavar: str | tuple | None = None
    config: str | None = None
    reads: str | None = None
    passes: tuple | None = None
    shown_default: str | None = None
    parse: Callable[[str], Any] | None = None


def setting(default: Any = dataclasses.MISSING, help: str = "", **spec) -> Any:
    """A settings field.

    ``default``: omitted for a required setting.  ``spec`` (all optional):

    ``flag``           the option (default ``--name-with-dashes``; ``--no-name`` for a bool that defaults to True)
    ``min``, ``max``   allowed range of a number (of each item of a list), inclusive unless
    ``min_open``, ``max_open``  are set
    ``choices``        allowed values; with ``open_choices`` they are only the usual values (schema, help)
                       and any text passes, because the stage checks it against what its input offers
    ``pattern``        regular expression a text must match, ``pattern_text`` says it in words
    ``nargs``          ``"+"`` or a count: the setting is a list (annotated ``tuple[...]``)
    ``metavar``        as for argparse
    ``config``         the workflow config key this setting owns (its schema node is this field's)
    ``reads``          a config key owned by another setting that this one also takes its value from
    ``passes``         with ``reads``: pass only these config values on (others leave the default)
    ``shown_default``  how ``--help`` shows the default (when the value alone would not say it)
    ``parse``          converts the command-line text (default: the annotated type)

    A config key may contain ``{source}`` (an input: geo, g1000, gtex), filled in by :func:`config_args`.
    """
    field = {"metadata": {"spec": Spec(help=help, **spec)}}
    if default is not dataclasses.MISSING:
        field["default"] = default
    return dataclasses.field(**field)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of a settings class, with its type resolved."""

    name: str
    command: str
    default: Any  # dataclasses.MISSING when required
    base: type  # int, float, str or bool (of each item, for a list)
    optional: bool  # None allowed
    spec: Spec

    @property
    def required(self) -> bool:
        """Whether the setting has no default (the option must be given)."""
        return self.default is dataclasses.MISSING

    @property
    def is_list(self) -> bool:
        """Whether the setting takes several values."""
        return self.spec.nargs is not None

    @property
    def flag(self) -> str:
        """The command-line option: ``--name``, or ``--no-name`` for a switch that is on by default."""
        if self.spec.flag:
            return self.spec.flag
        dashed = self.name.replace("_", "-")
        return f"--no-{dashed}" if self.base is bool and self.default is True else f"--{dashed}"

    @property
    def key(self) -> str | None:
        """The config key this setting takes its value from (owned or read)."""
        return self.spec.config or self.spec.reads

    def range_text(self) -> str | None:
        """The allowed range in words (e.g. ``in [0, 1)``, ``>= 1``), or None where there is none."""
        s = self.spec
        lo, hi = s.min, s.max
        if lo is not None and hi is not None:
            return f"in {'(' if s.min_open else '['}{lo!r}, {hi!r}{')' if s.max_open else ']'}"
        if lo is not None:
            return f"{'>' if s.min_open else '>='} {lo!r}"
        if hi is not None:
            return f"{'<' if s.max_open else '<='} {hi!r}"
        return None

    def problem(self, value: Any, *, choices: bool = True) -> str | None:
        """What is wrong with ``value`` ("must be ..., got ..."), or None.  ``choices=False``: argparse checks them."""
        if value is None:
            return None if self.optional else f"must be given, got {value!r}"
        if not self.is_list:
            return self.item_problem(value, choices=choices)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return f"must be a list of values, got {_show(value)}"
        n = self.spec.nargs
        if n == "+" and not value:
            return "must be one or more values, got an empty list"
        if isinstance(n, int) and len(value) != n:
            return f"must be {n} values, got {len(value)}"
        return next((p for p in (self.item_problem(v, choices=choices) for v in value) if p), None)

    def item_problem(self, v: Any, *, choices: bool = True) -> str | None:
        """What is wrong with one value (one item of a list setting), or None."""
        s = self.spec
        if self.base is bool:
            return None if isinstance(v, (bool, int)) else f"must be true or false, got {_show(v)}"
        if self.base is int and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            return f"must be an integer, got {_show(v)}"
        if self.base is float:
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                return f"must be a number, got {_show(v)}"
            if not math.isfinite(v):
                return f"must be a finite number, got {_show(v)}"
        if self.base is str:
            if not isinstance(v, (str, os.PathLike)):
                return f"must be text, got {_show(v)}"
            if s.pattern and not re.fullmatch(s.pattern, str(v)):
                return f"must be {s.pattern_text or 'a text matching ' + s.pattern}, got {_show(v)}"
        if choices and s.choices and not s.open_choices and v not in s.choices:
            return f"must be one of {', '.join(map(str, s.choices))}, got {_show(v)}"
        if (s.min is not None and (v < s.min or (s.min_open and v == s.min))) or (
            s.max is not None and (v > s.max or (s.max_open and v == s.max))
        ):
            return f"must be {self.range_text()}, got {_show(v)}"
        return None

    def help_text(self) -> str:
        """``--help`` text: the help, then the default (argparse %-escaped)."""
        text = self.spec.help
        if self.spec.shown_default:
            return f"{text} (default: {self.spec.shown_default})"
        if self.base is bool or self.required or self.default is None:
            return text
        return f"{text} (default {show_default(self.default)})".replace("%", "%%")


def _show(v: Any) -> str:
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return repr(int(v))
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return repr(float(v))
    if isinstance(v, os.PathLike):
        return repr(os.fspath(v))
    return repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..."


def show_default(value: Any) -> str:
    """A default as ``--help`` and config/README.md show it: 0.001, 1e-05, 4 5, geo-va."""
    if isinstance(value, (list, tuple)):
        return " ".join(show_default(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _resolve(annotation: Any) -> tuple[type, bool]:
    """(item type, None allowed) of ``int``, ``float | None``, ``tuple[float, ...]`` etc."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        optional, annotation = len(rest) < len(args), rest[0]
    if typing.get_origin(annotation) in (tuple, list):
        annotation = typing.get_args(annotation)[0]
    if annotation not in (int, float, str, bool):
        raise TypeError(f"settings support int, float, str and bool (and lists, None), not {annotation!r}")
    return annotation, optional


# --------------------------------------------------------------------------- #
# a stage's settings
# --------------------------------------------------------------------------- #
class Settings:
    """Base of the settings dataclasses: validation from the field specs."""

    #: the ``dgex`` verb these are the settings of ("interpret s2" for a sub-verb)
    command: ClassVar[str]

    def __post_init__(self) -> None:
        fields = settings_of(type(self))
        problems = [f"{s.flag} {p}" for s in fields if (p := s.problem(getattr(self, s.name))) is not None]
        if not problems:  # values that are fine alone, checked together
            flags = {s.name: s.flag for s in fields}
            problems = [f"{' and '.join(flags[n] for n in names)} {p}" for names, p in self.together(vars(self))]
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def together(cls, values: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """Rules between settings: (the field names involved, what is wrong) for each broken one.

        ``values`` holds every field.  The command line, the stage functions and the workflow's
        :func:`config_args` all apply these (each naming the values its own way).
        """
        return []

    @classmethod
    def check(cls, values: Mapping[str, Any]):
        """The settings among ``values`` (e.g. a stage function's ``locals()``), validated; unknown names ignored.

        Raises :class:`~dgex.errors.ConfigError` naming every bad value's flag.
        """
        return cls(**{s.name: values[s.name] for s in settings_of(cls) if s.name in values})


@cache
def settings_of(cls: type[Settings]) -> tuple[Setting, ...]:
    """The fields of a settings class, in order, with their types resolved."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, optional = _resolve(hints[f.name])
        out.append(Setting(f.name, cls.command, f.default, base, optional, f.metadata["spec"]))
    return tuple(out)


def _settings(command: str):
    def register(cls):
        cls.command = command
        cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        STAGES[command] = cls
        return cls

    return register


#: Settings class of every ``dgex`` verb that has settings, by verb.
STAGES: dict[str, type[Settings]] = {}

_SEED = {"min": 0, "max": MAX_SEED}
_DEVICE = {"pattern": DEVICE_PATTERN, "pattern_text": "auto, cpu, cuda or cuda:N"}
_PROGRESS = "no progress bar"


def parse_part(text: str) -> int | None:
    """``--part``: a part number, or ``all`` (None: one network over every target)."""
    return None if text == "all" else int(text)


# Field order is the order of the flags on a workflow job's command line (config_args), so keep
# the config-set fields in that order: reordering them changes the jobs' commands and with them
# Snakemake's record of the jobs (a rerun of finished results).


@_settings("demo-data")
class DemoSettings(Settings):
    """The settings of ``dgex demo-data``: size and noise of the synthetic GEO-, 1000G- and GTEx-like inputs."""

    seed: int = setting(0, "random seed", **_SEED, config="demo.seed")
    n_geo: int = setting(2000, "distinct GEO-like profiles", min=2, config="demo.n_geo")
    n_duplicates: int = setting(
        100, "planted near-duplicate GEO profiles for de-duplication to find", min=0, config="demo.n_duplicates"
    )
    n_1000g: int = setting(150, "1000G-like RNA-seq samples", min=2, config="demo.n_1000g")
    n_gtex: int = setting(300, "GTEx-like RNA-seq samples", min=2, config="demo.n_gtex")
    n_latent: int = setting(12, "shared latent factors", min=1, config="demo.n_latent")
    noise: float = setting(0.25, "gene-level noise s.d. in log2 units", min=0, min_open=True, config="demo.noise")
    target_seed: int = setting(0, "seed of the target-gene subset", **_SEED, reads="genes.target_seed")
    max_targets: int | None = setting(
        None,
        "use a seeded subset of this many target genes",
        min=2,
        reads="genes.max_targets",
        shown_default="all 9,520",
    )
    targets: str = setting(
        "builtin",
        "target set the data must cover: builtin (map_tg.txt) or u133a-probes (every HG-U133A probe, "
        "for the genome-wide model of config/l1000.yaml)",
        choices=("builtin", "u133a-probes"),
        reads="genes.targets",
        passes=("u133a-probes",),
    )


@_settings("acquire")
class AcquireSettings(Settings):
    """The settings of ``dgex acquire``: the expected size and checksum of the download, timeout and retries."""

    sha256: str | None = setting(
        None,
        "expected SHA-256 hex digest (recommended)",
        pattern=SHA256_PATTERN,
        pattern_text="64 hexadecimal digits",
        config="inputs.{source}.sha256",
    )
    size: int | None = setting(None, "expected size in bytes", min=1, config="inputs.{source}.size")
    timeout: float = setting(60.0, "network timeout in seconds", min=0, min_open=True)
    retries: int = setting(5, "retries after a broken connection", min=0)
    progress: bool = setting(True, _PROGRESS)


#: A sample filter on the command line: FIELD=V1,V2 per field (fields ANDed, values ORed).
_FILTER = (
    "keep only the {} samples whose column metadata FIELD (GCTX /0/META/COL/<FIELD>, GCT 1.3 column "
    "annotations; 'id' = the sample id, the only field of a TSV) is one of the values; several fields: all must match"
)
_FILTER_SPEC = {
    "nargs": "+",
    "metavar": "FIELD=V1,V2",
    "pattern": r"^[^=]+=.+$",
    "pattern_text": "FIELD=VALUE[,VALUE...]",
    "shown_default": "every sample",
}


@_settings("preprocess")
class PreprocessSettings(Settings):
    """The settings of ``dgex preprocess``: gene maps, de-duplication, standardisation, splits and target parts."""

    landmarks: str = setting(
        "builtin", "landmark gene map: builtin (map_lm.txt, 943 genes) or a path", config="genes.landmarks"
    )
    targets: str = setting(
        "builtin",
        "target gene map: builtin (map_tg.txt, 9,520 genes), u133a-probes (every HG-U133A probe) or a path",
        config="genes.targets",
    )
    target_seed: int = setting(0, "seed of the target subset", **_SEED, config="genes.target_seed")
    target_parts: int = setting(2, "random target parts, one network each", min=1, config="genes.parts")
    part_seed: int = setting(0, "seed of the target partition", **_SEED, config="genes.part_seed")
    dedup_clusters: int = setting(100, "MiniBatchKMeans K", min=1, config="preprocess.dedup_clusters")
    dedup_threshold: float = setting(
        1.0,
        "Euclidean distance below which two profiles are duplicates",
        min=0,
        min_open=True,
        config="preprocess.dedup_threshold",
    )
    standardize: str = setting(
        "transductive",
        "GEO statistics over all profiles (transductive, the paper) or the training split only (inductive)",
        choices=("transductive", "inductive"),
        config="preprocess.standardize",
    )
    epsilon: float = setting(1e-3, "(x - mean) / (std + epsilon)", min=0, min_open=True, config="preprocess.epsilon")
    va_fraction: float = setting(
        0.1, "GEO validation fraction", min=0, max=1, max_open=True, config="preprocess.va_fraction"
    )
    te_fraction: float = setting(0.1, "GEO test fraction", min=0, max=1, max_open=True, config="preprocess.te_fraction")
    split_seed: int = setting(0, "seed of the GEO split", **_SEED, config="preprocess.split_seed")
    seed: int = setting(0, "seed of MiniBatchKMeans", **_SEED, config="preprocess.seed")
    chunk_size: int = setting(4096, "GEO samples per streamed chunk", min=1, config="preprocess.chunk_size")
    memory_mb: int = setting(2048, "memory budget for de-duplication blocks", min=1, config="preprocess.memory_mb")
    max_targets: int | None = setting(
        None, "seeded subset of target genes", min=2, config="genes.max_targets", shown_default="all"
    )
    dedup: bool = setting(True, "skip duplicate removal", config="preprocess.dedup")
    geo_quantile_normalize: bool = setting(
        False,
        "quantile normalise GEO samples first (for inputs that are not yet normalised)",
        config="inputs.geo.quantile_normalize",
    )
    geo_log2: bool = setting(
        False, "log2(x+1)-transform GEO values first (linear-scale input)", config="inputs.geo.log2"
    )
    g1000_id_type: str = setting("ensembl", "gene ids of --g1000 rows", choices=ID_TYPES, config="inputs.g1000.id_type")
    gtex_id_type: str = setting("ensembl", "gene ids of --gtex rows", choices=ID_TYPES, config="inputs.gtex.id_type")
    # config inputs.<source>.filter is a mapping: common.smk writes it as these flags (filter_flags)
    geo_filter: tuple[str, ...] | None = setting(None, _FILTER.format("--geo"), **_FILTER_SPEC)
    g1000_filter: tuple[str, ...] | None = setting(None, _FILTER.format("--g1000"), **_FILTER_SPEC)
    gtex_filter: tuple[str, ...] | None = setting(None, _FILTER.format("--gtex"), **_FILTER_SPEC)
    progress: bool = setting(True, "no progress bars")

    @classmethod
    def together(cls, values):
        """Problems of the values taken together: the validation and test fractions must leave training profiles."""
        va, te = values["va_fraction"], values["te_fraction"]
        if va + te >= 1:
            return [
                (
                    ("va_fraction", "te_fraction"),
                    f"must add up to less than 1 (training needs profiles), got {va} + {te}",
                )
            ]
        return []


@_settings("prepare-test-set")
class TestSetSettings(Settings):
    """A test set's settings; the workflow takes them from its entry in ``test_sets:`` (common.smk)."""

    kind: str = setting(
        "gene",
        "probe: HG-U133A probe level like GEO; gene: gene level with --id-type like the RNA-seq inputs",
        choices=("probe", "gene"),
    )
    id_type: str = setting("ensembl", "gene ids of the rows (kind gene)", choices=ID_TYPES[:3])
    targets_id_type: str | None = setting(
        None, "gene ids of the --targets-source rows", choices=ID_TYPES[:3], shown_default="--id-type"
    )
    protocol: str = setting(
        "own-statistics",
        "own-statistics: rank-map onto the GEO reference, then each gene's own mean/s.d. (the paper's "
        "cross-platform protocol); geo-statistics: GEO's mean/s.d.",
        choices=("own-statistics", "geo-statistics"),
    )
    filter: tuple[str, ...] | None = setting(None, _FILTER.format("--source"), **_FILTER_SPEC)


@_settings("train")
class TrainSettings(Settings):
    """The settings of ``dgex train``; the fields of :class:`dgex.train.TrainConfig` have the same names."""

    layers: int = setting(help="hidden layers (paper: 1, 2, 3)", min=1)
    units: int = setting(help="units per hidden layer (paper: 3000, 6000, 9000)", min=1)
    dropout: float = setting(help="dropout rate in [0, 1) (paper: 0, 0.1, 0.25)", min=0, max=1, max_open=True)
    part: int | None = setting(
        help="target part (half) 0, 1, ... or 'all' for one joint network", min=0, parse=parse_part
    )
    epochs: int = setting(200, "epochs", min=1, config="train.epochs")
    batch_size: int = setting(200, "mini-batch size", min=1, config="train.batch_size")
    momentum: float = setting(0.5, "classical momentum", min=0, max=1, max_open=True, config="train.momentum")
    lr_decay: float = setting(
        0.9, "factor when the monitored MAE rises", min=0, max=1, min_open=True, config="train.lr_decay"
    )
    lr_min: float = setting(1e-5, "learning-rate floor", min=0, min_open=True, config="train.lr_min")
    monitor_size: int = setting(
        5000, "training profiles monitored for the decay rule", min=1, config="train.monitor_size"
    )
    optimizer: str = setting("sgd", "sgd (paper) or adamw", choices=OPTIMIZERS, config="train.optimizer")
    weight_decay: float = setting(0.0, "AdamW weight decay", min=0, config="train.weight_decay")
    precision: str = setting("32", "numeric precision", choices=PRECISIONS, config="train.precision")
    seed: int = setting(0, "seed of initialisation, shuffling and dropout", **_SEED, config="train.seed")
    device: str = setting("auto", "auto (GPU if present), cpu, cuda, cuda:N", **_DEVICE, config="train.device")
    lr: float | None = setting(
        None,
        "base learning rate",
        min=0,
        min_open=True,
        config="train.lr",
        shown_default="5e-4 for 1 layer, 3e-4 deeper",
    )
    threads: int | None = setting(None, "CPU threads for torch", min=1, shown_default="torch's choice")
    resume: bool = setting(
        False,
        "continue from OUTPUT_DIR/last.ckpt if present, to the same result as an uninterrupted run; a "
        "checkpoint that cannot be continued (it or its best_*.pt truncated, corrupt or missing; written for "
        "another dataset or other hyper-parameters; more epochs done than --epochs) is an error",
    )
    restart_incompatible: bool = setting(
        False, "with --resume: instead of that error, log why and train from scratch (the workflow passes this)"
    )
    keep_last: bool = setting(False, "keep last.ckpt after success (default: delete it)")
    gpu_lock_dir: str | None = setting(
        None,
        "folder of the GPU lease files shared by concurrent jobs",
        shown_default="$DGEX_GPU_LOCK_DIR or <tmp>/dgex-gpu-locks-<uid>",
    )
    checkpoint_interval: float = setting(
        60.0,
        "seconds between resumable checkpoints (last.ckpt + best weights; 0 = every epoch)",
        min=0,
        config="train.checkpoint_interval",
    )
    progress: bool = setting(True, _PROGRESS)


@_settings("baseline")
class BaselineSettings(Settings):
    """The settings of ``dgex baseline``: the hyper-parameter grids of the comparison methods."""

    lambdas: tuple[float, ...] | None = setting(
        None,
        "penalty grid for ridge/lasso, per-sample scale: ridge (1/n)RSS + L|w|^2 "
        "(sklearn alpha = n_train*L), lasso (1/2n)RSS + L|w|_1 (sklearn alpha = L)",
        nargs="+",
        metavar="L",
        shown_default="ridge: logspace(-4, 2, 13); lasso: sqrt(2 ln(landmarks)/n_train) * 2^-(0.5..4.5)",
    )
    ks: tuple[int, ...] | None = setting(
        None, "k grid for knn", nargs="+", metavar="K", shown_default="1 2 3 5 10 15 20 30 50 100"
    )
    n_jobs: int = setting(-1, "threads for the per-gene lasso fits (-1: all cores); other methods ignore it")
    progress: bool = setting(True, _PROGRESS)


@_settings("aggregate")
class AggregateSettings(Settings):
    """The settings of ``dgex aggregate``."""

    allow_incomplete: bool = setting(
        False,
        "aggregate grid points that lack target parts (and leave out unfinished run folders) instead of "
        "refusing; aggregate.json lists them and the tables and figures state them",
    )


@_settings("tables")
class TablesSettings(Settings):
    """The settings of ``dgex tables``: paper reference columns and the bootstrap confidence intervals."""

    paper_reference: bool = setting(
        False, "print the paper's published numbers beside ours", config="report.paper_reference"
    )
    n_boot: int = setting(2000, "bootstrap resamples for the confidence intervals", min=1, flag="--bootstrap")


@_settings("score-test-set")
class ScoreSettings(Settings):
    """The settings of ``dgex score-test-set``: bootstrap resamples and their seed."""

    n_boot: int = setting(
        2000, "bootstrap resamples of the test samples for the 95% CI of each mean MAE", min=1, flag="--bootstrap"
    )
    seed: int = setting(0, "seed of the bootstrap resamples", **_SEED)


_SELECTION = "which checkpoint to load: best_<selection>.pt"


@_settings("interpret s2")
class S2Settings(Settings):
    """The settings of ``dgex interpret s2``: the checkpoint, the profiles fitted (split, subsample), batching and device."""

    selection: str = setting("geo-va", _SELECTION, choices=SELECTIONS)
    split: str = setting(
        "geo-tr",
        "profiles to fit and score on (as in the paper: adjusted R² is in-sample)",
        choices=SPLITS,
        open_choices=True,  # the stage names the splits the dataset has
        config="interpret.s2_split",
    )
    max_samples: int | None = setting(
        None,
        "use a seeded random subset of this many profiles",
        min=2,
        config="interpret.s2_max_samples",
        shown_default="all",
    )
    seed: int = setting(0, "seed of the --max-samples subset", **_SEED)
    batch_size: int = setting(4096, "profiles per streamed chunk", min=1)
    device: str = setting("auto", "auto (GPU if present), cpu, cuda, cuda:N", **_DEVICE, reads="train.device")
    progress: bool = setting(True, _PROGRESS)


@_settings("interpret s3")
class S3Settings(Settings):
    """The settings of ``dgex interpret s3``: the checkpoint, the major-weight thresholds, how mean and std are taken, the map."""

    selection: str = setting("geo-va", _SELECTION, choices=SELECTIONS)
    sigmas: tuple[float, ...] = setting(
        (4.0, 5.0),
        "thresholds k (in standard deviations) applied to both weight matrices",
        min=0,
        min_open=True,
        nargs="+",
        metavar="K",
        config="interpret.sigmas",
    )
    scope: str = setting(
        "unit", "mean/std per landmark and per target (unit, the paper) or per whole matrix", choices=SCOPES
    )
    map_sigmas: tuple[float, ...] = setting(
        (4.0, 5.0),
        "thresholds of the connectivity map for input and output weights (the paper: 4 5)",
        min=0,
        min_open=True,
        nargs=2,
        metavar=("K_IN", "K_OUT"),
    )
    map_size: int = setting(60, "hidden units / genes shown in the connectivity map", min=1)
    progress: bool = setting(True, _PROGRESS)


@_settings("export")
class ExportSettings(Settings):
    """The settings of ``dgex export``: which best epoch is packaged and whether to replace a bundle."""

    selection: str = setting(
        "geo-va",
        "which validation choice to export: a D-GEX run's best_<selection>.pt, a baseline's "
        "coefficients_<selection>.npz",
        choices=SELECTIONS,
        config="export.selection",
    )
    overwrite: bool = setting(False, "replace an existing bundle folder")
    progress: bool = setting(True, _PROGRESS)


@_settings("infer")
class InferSettings(Settings):
    """The settings of ``dgex infer``: how input rows are matched to landmarks, output format, chunking, missing landmarks."""

    id_type: str = setting(
        "auto",
        "row ids of the input: ensembl, entrez, symbol or probe (L1000/HG-U133A, e.g. 200814_at); "
        "auto picks the type that matches the most landmarks",
        choices=("auto",) + ID_TYPES,
    )
    output_format: str | None = setting(
        None,
        "output format; the --output extension must agree with it: .gctx/.h5, .csv[.gz], .tsv/.txt[.gz], "
        ".h5ad (AnnData)",
        choices=FORMATS,
        flag="--format",
        shown_default="from the --output extension",
    )
    chunk_size: int = setting(4096, "input samples read per chunk", min=1)
    batch_size: int | None = setting(
        None,
        "samples predicted and written per batch; bounds memory",
        min=1,
        shown_default="about 64 MB of output per batch, 256..8192 samples",
    )
    impute_missing: str = setting(
        "none",
        "landmarks absent from the input: none = error listing them; mean = fill with the GEO training mean "
        "and warn (at least 50% must be present)",
        choices=("none", "mean"),
    )
    quantile_normalize: bool = setting(
        False,
        "rank-map each sample onto the GEO landmark reference first; use for inputs whose value "
        "distribution differs from GEO's quantile-normalised log2 arrays (other platforms or "
        "normalisations), not for inputs already on the GEO scale",
    )
    include_landmarks: bool = setting(
        False,
        "also write the input's measured landmark values (rows flagged pr_is_lm=1, pr_is_inferred=0; landmarks "
        "filled by --impute-missing flagged pr_is_imputed=1), as CMap's inferred matrices do",
    )
    well_inferred: str = setting(
        WELL_INFERRED,
        "criterion of the well_inferred row flag: a per-target reliability column the bundle carries "
        "(<mae|r|rho>_<geo_va|geo_te|1000g_va|gtex_te>), >= or <=, a number; none = no flag. Default: Pearson r "
        ">= 0.5 on the held-out GEO test split (see the README, 'Which inferred genes to trust')",
        pattern=r"\s*(none|[a-z0-9_]+\s*(>=|<=)\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*",
        pattern_text="<column> >= <number>, <column> <= <number> or none (e.g. r_geo_te>=0.5)",
        metavar="CRITERION",
    )
    device: str = setting("auto", "auto (GPU if present), cpu, cuda, cuda:N", **_DEVICE)
    overwrite: bool = setting(False, "replace an existing output file (and its provenance sidecar)")
    force: bool = setting(False, "allow csv/tsv/h5ad output (built in memory) above 20,000 samples")
    progress: bool = setting(True, _PROGRESS)


# --------------------------------------------------------------------------- #
# the workflow's side
# --------------------------------------------------------------------------- #
_MISSING = object()


def _lookup(config: Mapping, key: str) -> tuple[Mapping | None, Any]:
    """``(section, value)`` at dotted ``key`` of ``config``.

    ``section`` is None when a section on the way is absent or null; ``value``
    is ``_MISSING`` when the config leaves the key out.
    """
    node: Any = config
    *sections, leaf = key.split(".")
    for part in sections:
        node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:
            return None, _MISSING
    return (node, node.get(leaf, _MISSING)) if isinstance(node, Mapping) else (None, _MISSING)


def config_args(
    command: str, config: Mapping, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (), **keys: str
) -> list[str]:
    """Command-line arguments of ``dgex <command>`` for the settings the workflow ``config`` sets.

    In field order.  No flag for a setting whose config section is absent or null (an input not
    used), whose value is null (the stage's own default), that ``passes`` leaves out, or a bool at its
    default; a key the config leaves out gives the setting's default.  ``only``/``skip``: field names;
    ``keys`` fill placeholders such as ``{source}`` in the config keys.  A value the setting refuses
    raises :class:`~dgex.errors.ConfigError` naming the config key.
    """
    cls = STAGES[command]
    given: dict[str, Any] = {}  # every config-set value, checked; then only the selected ones become flags
    for s in settings_of(cls):
        if s.key is None:
            continue
        section, value = _lookup(config, s.key.format(**keys))
        if section is None:
            continue
        if value is _MISSING:
            value = None if s.required else s.default
        if value is None or (s.spec.passes is not None and value not in s.spec.passes):
            continue
        problem = s.problem(value)
        if problem:  # the schema refuses it first; this guards configs that skipped validation
            raise ConfigError(f"config key {s.key.format(**keys)} {problem}; it sets `dgex {command} {s.flag}`")
        given[s.name] = value
    fields = {s.name: s for s in settings_of(cls)}
    defaults = {s.name: None if s.required else s.default for s in fields.values()}
    for names, problem in cls.together({**defaults, **given}):
        if any(n in given for n in names):
            where = " and ".join(fields[n].key.format(**keys) if n in given else fields[n].flag for n in names)
            raise ConfigError(f"config {where} {problem}; fix the config")
    args: list[str] = []
    for s in settings_of(cls):
        if s.name not in given or s.name in skip or (only is not None and s.name not in only):
            continue
        value = given[s.name]
        if s.base is bool:
            if bool(value) != s.default:
                args.append(s.flag)
        elif s.is_list:
            args += [s.flag, *map(str, value)]
        else:
            args += [s.flag, str(value)]
    return args


def check_config(config: Mapping) -> None:
    """Every value the workflow ``config`` passes to a ``dgex`` command, checked as that command checks it.

    The workflow calls this at start, after the schema: it adds the rules between settings
    (:meth:`Settings.together`).  Raises :class:`~dgex.errors.ConfigError` naming the config key.
    """
    for command, cls in STAGES.items():
        per_input = any("{source}" in (s.key or "") for s in settings_of(cls))
        for keys in [{"source": source} for source in SOURCES] if per_input else [{}]:
            config_args(command, config, **keys)


def config_settings() -> dict[str, list[Setting]]:
    """{config key: the settings that take their value from it, the owner first}."""
    out: dict[str, list[Setting]] = {}
    for cls in STAGES.values():
        for s in settings_of(cls):
            if s.key is not None:
                out.setdefault(s.key, [])
                out[s.key].insert(0 if s.spec.config else len(out[s.key]), s)
    return out


def schema_node(s: Setting) -> dict:
    """The JSON-schema node (draft 2020-12) of the config key ``s`` owns: type, range, choices, default."""
    spec = s.spec
    if spec.choices:
        item: dict = {"enum": list(spec.choices)}
    else:
        item = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[s.base]}
    if spec.pattern:
        item["pattern"] = spec.pattern
    for bound, open_, name in ((spec.min, spec.min_open, "inimum"), (spec.max, spec.max_open, "aximum")):
        if bound is not None:
            item[("exclusiveM" if open_ else "m") + name] = bound
    if s.is_list:
        node = {"type": "array"}
        if spec.nargs == "+":
            node["minItems"] = 1
        else:
            node["minItems"] = node["maxItems"] = spec.nargs
        node["items"] = item
    else:
        node = item
    if s.optional:
        if "enum" in node:
            node["enum"] = node["enum"] + [None]
        else:
            node["type"] = [node["type"], "null"]
    if not s.required:
        node["default"] = list(s.default) if isinstance(s.default, tuple) else s.default
    return node
