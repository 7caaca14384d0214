"""The ``dgex`` command line: one sub-command per pipeline stage.

This module only parses arguments and calls one function per verb; the work
lives in the stage modules.  A :class:`~dgex.errors.DgexError` becomes a
one-line ``dgex: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import queue
import shutil
import signal
import sys
import textwrap
import threading
import weakref

from . import __version__
from .errors import DgexError
from .settings import ID_TYPES, SELECTIONS, STAGES, Setting, settings_of  # noqa: F401 (ID_TYPES, SELECTIONS: API)


def _value_type(s: Setting):
    """The argparse ``type`` of a setting: the text converted, then checked by the setting's own rule."""
    convert = s.spec.parse or s.base

    def value(text: str):
        result = convert(text)
        problem = s.item_problem(result, choices=False) if result is not None else None
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return result

    value.__name__ = convert.__name__  # argparse's "invalid int value: 'x'"
    return value


def _add_settings(p: argparse.ArgumentParser, command: str) -> None:
    """The options of ``dgex <command>``, one per field of its settings class (:mod:`dgex.settings`)."""
    for s in settings_of(STAGES[command]):
        kwargs: dict = {"dest": s.name, "help": s.help_text()}
        if s.base is bool:
            kwargs["action"] = "store_false" if s.default is True else "store_true"
        else:
            kwargs["type"] = _value_type(s)
            if s.required:
                kwargs["required"] = True
            else:
                kwargs["default"] = list(s.default) if isinstance(s.default, tuple) else s.default
            if s.spec.choices and not s.spec.open_choices:
                kwargs["choices"] = s.spec.choices
            for key in ("nargs", "metavar"):
                if getattr(s.spec, key) is not None:
                    kwargs[key] = getattr(s.spec, key)
        p.add_argument(s.flag, **kwargs)


#: ``add_argument`` keywords of the path options that several verbs share; each verb words its own help.
_PATH_OPTIONS = {
    "dataset": {"required": True},
    "runs": {"nargs": "+", "required": True, "metavar": "RUN_DIR"},
    "aggregate": {"required": True},
    "output_dir": {"required": True},
    "output": {"required": True},
}


def _add_paths(p: argparse.ArgumentParser, **helps: str) -> None:
    """Add the shared path options named by the keywords, in their order, each with its help text.

    ``_add_paths(p, dataset="...", output_dir="run folder")`` adds ``--dataset`` and ``--output-dir``.
    """
    for name, help_text in helps.items():
        p.add_argument("--" + name.replace("_", "-"), help=help_text, **_PATH_OPTIONS[name])


def build_parser() -> argparse.ArgumentParser:
    """The ``dgex`` argument parser: one sub-command per stage, its options from :mod:`dgex.settings`."""
    parser = argparse.ArgumentParser(
        prog="dgex",
        description="D-GEX: infer target gene expression from landmark genes with deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"dgex {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---------------------------------------------------------------- demo-data
    p = sub.add_parser(
        "demo-data",
        help="generate the embedded synthetic demo inputs (GEO-, 1000G-, GTEx-like)",
        description="Write seeded synthetic inputs shaped like the real ones: a probe-level HG-U133A "
        "GCTX (geo.gctx), a GEUVADIS-like RPKM table (1000g.tsv.gz) and a GTEx-like "
        "gene-level GCTX (gtex.gctx), plus demo.json describing them.",
    )
    _add_paths(p, output_dir="folder to write the files into")
    _add_settings(p, "demo-data")

    # ---------------------------------------------------------------- acquire
    p = sub.add_parser(
        "acquire",
        help="download one input file (resumable, verified, atomic)",
        description="Download URL to OUTPUT with a progress bar, resuming a partial download, "
        "verifying size and SHA-256 when given, and renaming into place only when complete.",
    )
    p.add_argument("--url", required=True, help="http(s) or file:// URL")
    _add_paths(p, output="destination file")
    _add_settings(p, "acquire")

    # ---------------------------------------------------------------- preprocess
    p = sub.add_parser(
        "preprocess",
        help="build one processed dataset (splits, halves, statistics) from raw inputs",
        description="Probe->gene means, optional quantile normalisation, MiniBatchKMeans "
        "de-duplication, RNA-seq quantile mapping onto the GEO reference, per-gene "
        "standardisation, seeded splits and target parts; streams the GEO input in chunks.",
    )
    p.add_argument("--geo", required=True, help="GEO probe-level HG-U133A matrix (.gctx, .gct, .tsv)")
    p.add_argument(
        "--g1000", default=None, help="1000G RNA-seq gene-level matrix (cross-platform validation); optional"
    )
    p.add_argument("--gtex", default=None, help="GTEx RNA-seq gene-level matrix (cross-platform test); optional")
    _add_paths(p, output="processed dataset (.h5)")
    p.add_argument("--summary", default=None, help="JSON summary (default: OUTPUT with .json)")
    _add_settings(p, "preprocess")

    # ---------------------------------------------------------------- prepare-test-set
    p = sub.add_parser(
        "prepare-test-set",
        help="bring an extra data set with landmarks and targets to a dataset's genes and scale",
        description="Read a test set (probe-level HG-U133A or gene-level; landmarks and targets from one "
        "matrix, or two paired by sample id), optionally filtered by column metadata, and write its "
        "standardised landmarks and targets in the processed dataset's gene order (data.h5).",
    )
    p.add_argument("--dataset", required=True, help="processed dataset from `dgex preprocess`")
    p.add_argument("--name", required=True, help="name of the test set (stored in the output)")
    p.add_argument("--source", required=True, help="matrix with the landmarks (and targets) (.gctx, .gct, .tsv)")
    p.add_argument("--targets-source", default=None, help="separate matrix with the targets, paired by sample id")
    p.add_argument("--source-label", default=None, help="where the data came from, e.g. its URL (default: --source)")
    p.add_argument("--output", required=True, help="prepared test set (data.h5)")
    _add_settings(p, "prepare-test-set")

    # ---------------------------------------------------------------- train
    p = sub.add_parser(
        "train",
        help="train one D-GEX network (one grid point x one target part)",
        description="Train D-GEX with the paper's recipe (SGD momentum 0.5, batch 200, 3x deep "
        "learning rates, 0.9 decay on a 5,000-profile training monitor) and keep the "
        "best epochs by GEO-va and by 1000G-va. Writes best_*.pt, history.csv, "
        "per_gene.csv and run.json into OUTPUT_DIR.",
    )
    _add_paths(p, dataset="processed dataset from `dgex preprocess`", output_dir="run folder")
    _add_settings(p, "train")

    # ---------------------------------------------------------------- baseline
    p = sub.add_parser(
        "baseline",
        help="fit a comparison method (LR, LR-L2, LR-L1, KNN-GE) and score it on every split",
        description="Train a baseline on GEO-tr, choose its hyper-parameter by the overall MAE on GEO-va "
        "(and, if present, on 1000G-va for the cross-platform task), and score each chosen model "
        "on GEO-va, GEO-te, 1000G-va and GTEx-te. Writes per_gene.csv, metrics.json and run.json "
        "into OUTPUT_DIR.",
    )
    p.add_argument(
        "method",
        metavar="{lr,ridge,lasso,knn}",
        help="lr: least squares (LR); ridge: L2 penalty (LR-L2); lasso: L1 penalty per gene (LR-L1); "
        "knn: mean of the k nearest landmark genes (KNN-GE)",
    )
    _add_paths(p, dataset="processed dataset from `dgex preprocess`", output_dir="run folder")
    _add_settings(p, "baseline")

    # ---------------------------------------------------------------- aggregate
    p = sub.add_parser(
        "aggregate",
        help="collect finished runs into one folder (per-gene errors, summaries, histories)",
        description="Read D-GEX and baseline run folders (run.json + per_gene.csv [+ history.csv]) and "
        "write per_gene.csv.gz, summary.csv, history.csv, runs.csv and aggregate.json.",
    )
    p.add_argument(
        "--dgex-runs", nargs="*", default=[], metavar="DIR", help="D-GEX run folders (one per grid point x part)"
    )
    p.add_argument("--baseline-runs", nargs="*", default=[], metavar="DIR", help="baseline run folders")
    _add_paths(p, output_dir="aggregate folder")
    p.add_argument(
        "--dataset",
        default=None,
        help="processed dataset the runs were trained on: its target parts are what every grid point must have "
        "(default: the dataset named in the runs' run.json)",
    )
    _add_settings(p, "aggregate")

    # ---------------------------------------------------------------- tables
    p = sub.add_parser(
        "tables",
        help="Tables 1-2, S2-S5 and the statistics table (CSV + Markdown)",
        description="Write table1 (GEO-te), table2 (GTEx-te), tableS2-S5 (all dropout rates on "
        "GEO-va, GEO-te, 1000G-va, GTEx-te) and table_stats, each as .csv and .md, "
        "plus tables.json. Dropout rates and architectures shown are chosen on validation.",
    )
    _add_paths(p, aggregate="folder written by `dgex aggregate`", output_dir="tables folder")
    _add_settings(p, "tables")

    # ---------------------------------------------------------------- figures
    p = sub.add_parser(
        "figures",
        help="Figures 1-5 of the paper (PNG + PDF)",
        description="Draw Figures 1-5 from an aggregate folder, choosing the models shown on "
        "validation as the paper did; writes figures.json with captions.",
    )
    _add_paths(p, aggregate="folder written by `dgex aggregate`", output_dir="figures folder")

    # ---------------------------------------------------------------- report
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page with every table and figure of a finished run",
        description="Render a run's tables, figures (embedded), captions and S2/S3 analyses as one HTML page "
        "readable offline, e.g. dgex report --results-dir results/demo (writes results/demo/report.html).",
    )
    p.add_argument("--results-dir", required=True, help="the run's results folder (results/<name>)")
    p.add_argument("--output", default=None, help="HTML file to write (default: RESULTS_DIR/report.html)")
    p.add_argument("--name", default=None, help="run name shown in the title (default: the folder's name)")

    # ---------------------------------------------------------------- score-test-set
    p = sub.add_parser(
        "score-test-set",
        help="score every D-GEX and baseline on a prepared test set (per-gene file, table, figure)",
        description="Predict a prepared test set's targets from its landmarks with every D-GEX grid point and "
        "every baseline (both selections) and write test_sets/<set>/per_gene.csv and score.json, "
        "tables/test_set_<set>.csv|md (MAE ± std, bootstrap CI over samples, win rate and Wilcoxon p against "
        "LR-L2 and the best D-GEX) and figures/test_set_<set>_scatter.png|pdf under --output-dir.",
    )
    p.add_argument("--test-set", required=True, help="test_sets/<set>/data.h5 written by `dgex prepare-test-set`")
    p.add_argument("--dataset", required=True, help="processed dataset the models were trained on")
    p.add_argument("--aggregate", required=True, help="folder written by `dgex aggregate` (chooses the best D-GEX)")
    p.add_argument("--dgex-runs", nargs="*", default=[], metavar="DIR", help="D-GEX run folders (every part)")
    p.add_argument("--baseline-runs", nargs="*", default=[], metavar="DIR", help="baseline run folders")
    p.add_argument("--name", default=None, help="test set name (default: the data.h5's name attribute)")
    p.add_argument("--output-dir", required=True, help="results folder (results/<name>)")
    _add_settings(p, "score-test-set")
    p = sub.add_parser(
        "collect-test-sets",
        help="tables/test_sets.json: every scored test set for the report",
        description="Gather the score.json of every test set (in the order given) into one JSON file.",
    )
    p.add_argument("scores", nargs="+", metavar="SCORE_JSON", help="test_sets/<set>/score.json files")
    p.add_argument("--output", required=True, help="tables/test_sets.json")

    # ---------------------------------------------------------------- interpret
    p = sub.add_parser(
        "interpret",
        help="supplementary analyses S2 (nonlinearity) and S3 (major weights)",
        description="Interpret a trained D-GEX network as in the paper's section 3.3: "
        "`s2` compares per-gene adjusted R² of linear fits from the landmarks and from "
        "each hidden layer; `s3` maps the major weights of a 1-hidden-layer network.",
    )
    isub = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    q = isub.add_parser(
        "s2",
        help="adjusted R² of each target from the raw inputs vs each hidden layer (Figure S2)",
        description="Fit every target gene by least squares (with intercept) from the landmarks and "
        "from each hidden layer's activations (eval mode) of one network (all its part "
        "runs), and report the adjusted R² on the same profiles. Writes "
        "s2_adjusted_r2.csv, s2_summary.csv, figure_s2.png/.pdf and s2.json. A fit with p predictors needs "
        "more than p + 1 profiles: where the split has fewer, the outputs say 'not computed' and why "
        "(s2.json status and reason) and the command still succeeds.",
    )
    _add_paths(
        q,
        dataset="processed dataset the network was trained on",
        runs="the part run folders of one network (written by `dgex train`)",
        output_dir="folder for the S2 outputs",
    )
    _add_settings(q, "interpret s2")
    q = isub.add_parser(
        "s3",
        help="major-weight connectivity of a 1-hidden-layer network (Figure S3)",
        description="Keep the weights more than k standard deviations from the mean (per landmark "
        "for input->hidden, per target for hidden->output, as in the paper) and count "
        "the major connections of every hidden unit, landmark and target gene. Writes "
        "s3_hidden_in_degree.csv, s3_hidden_out_degree.csv, s3_landmark_out_degree.csv, "
        "s3_target_in_degree.csv, figure_s3.png/.pdf and s3.json.",
    )
    _add_paths(q, runs="the part run folders of one 1-hidden-layer network (paper: 3000x1)")
    q.add_argument(
        "--dataset", default=None, help="processed dataset (optional): checks the genes and adds gene symbols"
    )
    _add_paths(q, output_dir="folder for the S3 outputs")
    _add_settings(q, "interpret s3")

    # ---------------------------------------------------------------- export
    p = sub.add_parser(
        "export",
        help="package the part networks of one trained grid point as a model bundle",
        description="Write a self-contained model bundle folder for `dgex infer`: bundle.json "
        "(format, architecture, training config, selection, metrics, checksums), "
        "weights_part<k>.pt, landmarks.tsv, targets.tsv and stats.npz (GEO statistics "
        "and quantile references). Written to a temporary folder and renamed into place.",
    )
    _add_paths(p, dataset="processed dataset the runs were trained on")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN_DIR",
        help="the finished part runs of one grid point (one folder per target part)",
    )
    src.add_argument(
        "--grid-aggregate",
        metavar="AGG_DIR",
        help="an aggregate folder (`dgex aggregate`): export its grid point chosen on validation "
        "(GEO-va for --selection geo-va, 1000G-va for 1000g-va), as Table 1/2 do",
    )
    src.add_argument(
        "--baseline-run",
        metavar="RUN_DIR",
        help="a `dgex baseline` folder (e.g. runs/baselines/ridge): export its linear model chosen by "
        "--selection as a linear bundle (kind linear: linear.npz instead of networks)",
    )
    _add_paths(p, output="bundle folder to create")
    _add_settings(p, "export")

    # ---------------------------------------------------------------- prefer-model
    p = sub.add_parser(
        "prefer-model",
        help="say which of several model bundles validation prefers",
        description="Compare model bundles exported with the same --selection (e.g. the chosen D-GEX and the "
        "chosen LR-L2) by their overall validation MAE on that split and write the verdict as JSON.",
    )
    p.add_argument("--bundles", nargs="+", required=True, metavar="BUNDLE", help="model bundle folders")
    p.add_argument("--output", required=True, help="JSON file to write (e.g. results/<name>/preferred_model.json)")

    # ---------------------------------------------------------------- infer
    p = sub.add_parser(
        "infer",
        help="predict target genes for your landmark profiles with a model bundle",
        description="Map the input's rows (genes) onto the model's landmarks, standardise with the "
        "bundle's GEO statistics, predict every target part and write target expression "
        "(log2, GEO scale) for every input sample. GCTX input is streamed in chunks of "
        "samples and GCTX output written incrementally, so memory stays flat. Rows carry CMap's "
        "metadata (pr_gene_id, pr_gene_symbol, pr_ensembl_id, pr_probe_id, pr_is_lm, ...); every output "
        "records its provenance (bundle id and sha256, model, training data, dgex version) and warns when "
        "the model was trained on synthetic demo data.",
    )
    p.add_argument("--model", required=True, help="model bundle folder written by `dgex export`")
    p.add_argument(
        "--input",
        required=True,
        help="genes x samples log2 expression: .gctx (streamed), .gct, .tsv or .csv (rows: landmark genes)",
    )
    _add_paths(
        p,
        output="predictions: .gctx (any size), .h5ad (AnnData), .csv/.tsv (small inputs; .gz to compress; "
        "provenance in OUTPUT.provenance.json)",
    )
    _add_settings(p, "infer")

    # ---------------------------------------------------------------- gpus
    p = sub.add_parser(
        "gpus",
        help="list visible GPUs and which are leased by dgex jobs",
        description="Show each GPU this process may use (DGEX_GPUS, nvidia-smi, CUDA_VISIBLE_DEVICES) "
        "and whether a dgex training job holds its lease.",
    )
    p.add_argument("--lock-dir", default=None, help="lease folder (default as for `dgex train`)")

    for name, text in EXAMPLES.items():
        if name in sub.choices:
            _add_examples(sub.choices[name], text)
    _group_commands(parser, sub)
    return parser


#: Commands people run themselves; every other command is a step of the Snakemake workflow.
USER_COMMANDS = ("infer", "export", "gpus", "report")

#: The examples shown at the end of each user command's ``--help``.
EXAMPLES = {
    "infer": """\
  # predictions for L1000 level-3 profiles (rows: probe ids, Entrez ids, symbols or Ensembl ids)
  dgex infer --model results/l1000/model --input my_l1000_level3.gctx --output predicted.gctx
  # keep the measured landmarks beside the inferred genes (flagged pr_is_lm=1), as CMap's matrices do
  dgex infer --model results/l1000/model --input my.gctx --output all_genes.gctx --include-landmarks
  # RNA-seq log2(TPM + 1) of another platform, 20 missing landmarks filled with the GEO mean, for Python users
  dgex infer --model results/real/model --input rnaseq.tsv --output predicted.h5ad \\
      --quantile-normalize --impute-missing mean
  # a small table for a spreadsheet (provenance in predicted.csv.gz.provenance.json)
  dgex infer --model results/real/model --input my.gct --output predicted.csv.gz

  The demo's bundle (results/demo/model) is trained on synthetic data: fine for trying the
  command, meaningless for real samples (infer warns about it).""",
    "export": """\
  # the grid point chosen on GEO-va in an aggregate folder, as Table 1 does
  dgex export --dataset results/real/data/dataset.h5 --grid-aggregate results/real/aggregate \\
      --output my_model
  # explicit part runs of one grid point (one folder per target part)
  dgex export --dataset results/real/data/dataset.h5 \\
      --runs results/real/runs/dgex/3x9000_d0.1/part0 results/real/runs/dgex/3x9000_d0.1/part1 --output my_model
  # the LR-L2 (ridge) model chosen on GEO-va, as a linear bundle for the same `dgex infer`
  dgex export --dataset results/real/data/dataset.h5 --baseline-run results/real/runs/baselines/ridge \\
      --output my_linear_model""",
    "gpus": """\
  dgex gpus                      # which GPUs are visible and which a dgex job holds
  DGEX_GPUS=0,1 dgex gpus        # only the GPUs dgex may use""",
}


def _add_examples(p: argparse.ArgumentParser, text: str) -> None:
    """Show ``text`` as an Examples section under ``p``'s help, kept as written (the description is wrapped here)."""
    width = max(40, min(100, shutil.get_terminal_size().columns) - 2)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = textwrap.fill(p.description or "", width)
    p.epilog = "examples:\n" + text


def _group_commands(parser: argparse.ArgumentParser, sub) -> None:
    """List the commands in ``dgex --help`` in two groups: user commands, then the workflow's steps."""
    helps = {a.dest: a.help for a in sub._choices_actions}  # argparse keeps each command's help only here
    sub._choices_actions[:] = []  # listed in the epilog instead, grouped
    sub.help = "one of the commands below; `dgex COMMAND --help` tells more"
    width = max(len(n) for n in helps) + 2

    def listing(names) -> str:
        return "\n".join(f"  {n:<{width}}{helps[n]}" for n in names)

    user = [n for n in USER_COMMANDS if n in helps]
    steps = [n for n in helps if n not in USER_COMMANDS]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        f"user commands:\n{listing(user)}\n\n"
        f"workflow steps (run for you by `snakemake`; by hand for single stages):\n{listing(steps)}\n\n"
        f"examples:\n  dgex infer --model results/l1000/model --input my.gctx --output predicted.gctx\n"
        f"  dgex infer --help"
    )


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every ``finally`` and temporary-file clean-up runs.

    A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` blocks do not swallow it.
    """


#: Signals received while HDF5 must not be interrupted, to be delivered again by these timers ...
_deferred: dict[int, threading.Timer] = {}
#: ... and those not answered by an exception reaching main (late, or swallowed on the way).
_late: list[int] = []
_finishing = False


#: Standard-library code that an exception at an arbitrary line can leave locked or inconsistent
#: (a lock taken but never released, a queue item never announced: seen to hang `dgex infer`).
_UNSAFE_FILES = frozenset(m.__file__ for m in (threading, queue, contextlib, logging, weakref))


def _unsafe_to_raise(frame) -> bool:
    """Whether an exception raised at ``frame`` could hang, crash or be dropped: then the signal waits.

    Inside h5py / HDF5 work (see :func:`dgex.io.hdf5_busy`), in threading, queue,
    contextlib, logging or weakref code, or in a ``__del__`` (where Python drops exceptions).
    """
    dio = sys.modules.get("dgex.io")
    if dio is not None and dio.hdf5_busy(frame):
        return True
    while frame is not None:
        if frame.f_code.co_filename in _UNSAFE_FILES or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_signal(signum, frame):
    """SIGTERM -> :class:`Terminated`, SIGINT -> ``KeyboardInterrupt``, raised where that is safe (see below)."""
    if _finishing:
        _late.append(signum)
        return
    if _unsafe_to_raise(frame):  # deliver the signal again shortly, when the main thread is elsewhere
        timer = threading.Timer(0.01, os.kill, (os.getpid(), signum))
        timer.daemon = True
        _deferred[signum] = timer
        timer.start()
        return
    _deferred.pop(signum, None)
    _late.append(signum)  # until the exception reaches main (it is taken back there)
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Terminated()
    raise KeyboardInterrupt()


def main(argv: list[str] | None = None) -> int:
    """Run ``dgex`` with ``argv`` (default: the process's arguments) and return its exit status.

    0 on success, 2 for a :class:`~dgex.errors.DgexError` (one ``dgex: error:`` line on stderr),
    130 or 128 + signal number when interrupted or terminated; SIGTERM and SIGINT are turned into
    exceptions only where that is safe, so temporary files are always removed.
    """
    global _finishing
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handled = (signal.SIGTERM, signal.SIGINT)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = {s: signal.getsignal(s) for s in handled}
    _deferred.clear()
    _late.clear()
    _finishing = False
    if main_thread:
        for s in handled:
            signal.signal(s, _on_signal)
    try:
        rc = _run(args)
    finally:
        _finishing = True  # a signal from now on is only noted
        for signum, timer in list(_deferred.items()):  # deferred during the last writes, not delivered yet
            timer.cancel()
            timer.join()
            if signum not in _late:
                _late.append(signum)
        _deferred.clear()
        if main_thread:
            for s in handled:
                if previous[s] is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(s, previous[s])
    # a signal that came during the last writes, or whose exception something swallowed: the outputs are
    # whole, but the run was stopped
    if _late and rc == 0:
        print(f"dgex: terminated ({signal.Signals(_late[0]).name}) as it finished", file=sys.stderr)
        return 128 + _late[0]
    return rc


def _run(args: argparse.Namespace) -> int:
    """Run the verb; every error becomes one line and an exit status."""
    try:
        return _dispatch(args) or 0
    except DgexError as exc:
        print(f"dgex: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # last resort: a file operation no stage turned into a DgexError
        from .io import describe_os_error  # imports h5py/pandas: only when needed

        print(f"dgex: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _late.clear()
        print("dgex: interrupted; temporary files were removed", file=sys.stderr)
        return 130
    except Terminated:
        _late.clear()
        print("dgex: terminated (SIGTERM); temporary files were removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except SystemExit as exc:
        # Lightning answers SIGTERM with its own SIGTERMException, a SystemExit with status 0
        if type(exc).__name__ != "SIGTERMException" and signal.SIGTERM not in (*_late, *_deferred):
            raise
        _late.clear()
        print("dgex: terminated (SIGTERM); temporary files were removed", file=sys.stderr)
        return 128 + signal.SIGTERM


#: The stage function behind each verb, as (module, function): imported on use, so that `dgex --help` stays fast.
STAGE_FUNCTIONS = {
    "demo-data": ("demo", "generate"),
    "acquire": ("acquire", "download"),
    "preprocess": ("preprocess", "preprocess"),
    "prepare-test-set": ("test_sets", "prepare_test_set"),
    "train": ("train", "train"),
    "baseline": ("baselines", "run_baseline"),
    "aggregate": ("aggregate", "aggregate"),
    "tables": ("tables", "make_tables"),
    "figures": ("figures", "make_figures"),
    "report": ("report", "make_report"),
    "score-test-set": ("evaluate", "score_test_set"),
    "collect-test-sets": ("evaluate", "collect_test_sets"),
    "interpret s2": ("interpret", "interpret_s2"),
    "interpret s3": ("interpret", "interpret_s3"),
    "export": ("bundle", "export_bundle"),
    "prefer-model": ("bundle", "prefer_model"),
    "infer": ("infer", "infer"),
}


def _print_gpus(lock_dir) -> None:
    from .devices import lease_status

    rows = lease_status(lock_dir)
    if not rows:
        print("no GPU visible: training runs on the CPU")
    for r in rows:
        print(f"GPU {r['gpu']}: " + (f"leased by {r['holder']}" if r["leased"] else "free"))


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "gpus":
        _print_gpus(args.lock_dir)
        return 0
    kwargs = {k.replace("-", "_"): v for k, v in vars(args).items() if k not in ("command", "verbose")}
    verb = f"interpret {kwargs.pop('analysis')}" if args.command == "interpret" else args.command
    module, function = STAGE_FUNCTIONS[verb]
    getattr(importlib.import_module(f".{module}", __package__), function)(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
