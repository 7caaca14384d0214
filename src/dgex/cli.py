"""The ``dgex`` command line: one sub-command per pipeline stage.

This module only parses arguments and calls one function per verb; the work
lives in the stage modules.  A :class:`~dgex.errors.DgexError` becomes a
one-line ``dgex: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import queue
import signal
import sys
import threading
import weakref

from . import __version__
from .errors import DgexError


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _finite_float(text: str) -> float:
    """A float option: NaN and +-Inf are never a meaningful setting (every float option uses this or a narrower type)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


#: Seeds are numpy/torch seeds: integers in [0, 2**32).
MAX_SEED = 2**32 - 1


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..{MAX_SEED}, got {value}")
    return value


def _fraction(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _nonneg_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


ID_TYPES = ("ensembl", "entrez", "symbol", "probe")
SELECTIONS = ("geo-va", "1000g-va")  # as dgex.dataset.SELECTIONS; not imported, so that --help stays fast


def _add_no_progress(p: argparse.ArgumentParser, bars: str = "bar") -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help=f"no progress {bars}")


def _add_selection(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--selection", choices=SELECTIONS, default="geo-va", help=f"{what}: best_<selection>.pt (default geo-va)"
    )


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--output-dir", required=True, help="folder to write the files into")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    p.add_argument("--n-geo", type=_positive_int, default=2000, help="distinct GEO-like profiles (default 2000)")
    p.add_argument(
        "--n-duplicates",
        type=_nonneg_int,
        default=100,
        help="planted near-duplicate GEO profiles for de-duplication to find (default 100)",
    )
    p.add_argument("--n-1000g", type=_positive_int, default=150, help="1000G-like RNA-seq samples (default 150)")
    p.add_argument("--n-gtex", type=_positive_int, default=300, help="GTEx-like RNA-seq samples (default 300)")
    p.add_argument("--n-latent", type=_positive_int, default=12, help="shared latent factors (default 12)")
    p.add_argument(
        "--noise", type=_positive_float, default=0.25, help="gene-level noise s.d. in log2 units (default 0.25)"
    )
    p.add_argument(
        "--max-targets",
        type=_positive_int,
        default=None,
        help="use a seeded subset of this many target genes (default: all 9,520)",
    )
    p.add_argument("--target-seed", type=_seed, default=0, help="seed of the target-gene subset (default 0)")
    p.add_argument(
        "--targets",
        choices=("builtin", "u133a-probes"),
        default="builtin",
        help="target set the data must cover: builtin (map_tg.txt) or u133a-probes (every HG-U133A probe, "
        "for the genome-wide model of config/l1000.yaml)",
    )

    # ---------------------------------------------------------------- acquire
    p = sub.add_parser(
        "acquire",
        help="download one input file (resumable, verified, atomic)",
        description="Download URL to OUTPUT with a progress bar, resuming a partial download, "
        "verifying size and SHA-256 when given, and renaming into place only when complete.",
    )
    p.add_argument("--url", required=True, help="http(s) or file:// URL")
    p.add_argument("--output", required=True, help="destination file")
    p.add_argument("--sha256", default=None, help="expected SHA-256 hex digest (recommended)")
    p.add_argument("--size", type=_nonneg_int, default=None, help="expected size in bytes")
    p.add_argument("--timeout", type=_positive_float, default=60.0, help="network timeout in seconds (default 60)")
    p.add_argument("--retries", type=_nonneg_int, default=5, help="retries after a broken connection (default 5)")
    _add_no_progress(p)

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
        "--geo-quantile-normalize",
        action="store_true",
        help="quantile normalise GEO samples first (for inputs that are not yet normalised)",
    )
    p.add_argument("--geo-log2", action="store_true", help="log2(x+1)-transform GEO values first (linear-scale input)")
    p.add_argument(
        "--g1000", default=None, help="1000G RNA-seq gene-level matrix (cross-platform validation); optional"
    )
    p.add_argument(
        "--g1000-id-type", choices=ID_TYPES, default="ensembl", help="gene ids of --g1000 rows (default ensembl)"
    )
    p.add_argument("--gtex", default=None, help="GTEx RNA-seq gene-level matrix (cross-platform test); optional")
    p.add_argument(
        "--gtex-id-type", choices=ID_TYPES, default="ensembl", help="gene ids of --gtex rows (default ensembl)"
    )
    p.add_argument("--landmarks", default="builtin", help="landmark gene map (default: builtin map_lm.txt)")
    p.add_argument("--targets", default="builtin", help="target gene map (default: builtin map_tg.txt)")
    p.add_argument(
        "--max-targets", type=_positive_int, default=None, help="seeded subset of target genes (default all)"
    )
    p.add_argument("--target-seed", type=_seed, default=0, help="seed of the target subset (default 0)")
    p.add_argument(
        "--target-parts", type=_positive_int, default=2, help="random target parts, one network each (default 2)"
    )
    p.add_argument("--part-seed", type=_seed, default=0, help="seed of the target partition (default 0)")
    p.add_argument("--no-dedup", action="store_true", help="skip duplicate removal")
    p.add_argument("--dedup-clusters", type=_positive_int, default=100, help="MiniBatchKMeans K (default 100)")
    p.add_argument(
        "--dedup-threshold",
        type=_nonneg_float,
        default=1.0,
        help="Euclidean distance below which two profiles are duplicates (default 1.0)",
    )
    p.add_argument(
        "--standardize",
        choices=("transductive", "inductive"),
        default="transductive",
        help="GEO statistics over all profiles (paper) or the training split only",
    )
    p.add_argument("--epsilon", type=_positive_float, default=1e-3, help="(x - mean) / (std + epsilon) (default 1e-3)")
    p.add_argument("--va-fraction", type=_fraction, default=0.1, help="GEO validation fraction (default 0.1)")
    p.add_argument("--te-fraction", type=_fraction, default=0.1, help="GEO test fraction (default 0.1)")
    p.add_argument("--split-seed", type=_seed, default=0, help="seed of the GEO split (default 0)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of MiniBatchKMeans (default 0)")
    p.add_argument(
        "--chunk-size", type=_positive_int, default=4096, help="GEO samples per streamed chunk (default 4096)"
    )
    p.add_argument(
        "--memory-mb", type=_positive_int, default=2048, help="memory budget for de-duplication blocks (default 2048)"
    )
    p.add_argument("--output", required=True, help="processed dataset (.h5)")
    p.add_argument("--summary", default=None, help="JSON summary (default: OUTPUT with .json)")
    _add_no_progress(p, "bars")
    # ---------------------------------------------------------------- train
    p = sub.add_parser(
        "train",
        help="train one D-GEX network (one grid point x one target part)",
        description="Train D-GEX with the paper's recipe (SGD momentum 0.5, batch 200, 3x deep "
        "learning rates, 0.9 decay on a 5,000-profile training monitor) and keep the "
        "best epochs by GEO-va and by 1000G-va. Writes best_*.pt, history.csv, "
        "per_gene.csv and run.json into OUTPUT_DIR.",
    )
    p.add_argument("--dataset", required=True, help="processed dataset from `dgex preprocess`")
    p.add_argument("--output-dir", required=True, help="run folder")
    p.add_argument("--layers", type=_positive_int, required=True, help="hidden layers (paper: 1, 2, 3)")
    p.add_argument(
        "--units", type=_positive_int, required=True, help="units per hidden layer (paper: 3000, 6000, 9000)"
    )
    p.add_argument("--dropout", type=_fraction, required=True, help="dropout rate in [0, 1) (paper: 0, 0.1, 0.25)")
    p.add_argument(
        "--part", type=_part, required=True, help="target part (half) 0, 1, ... or 'all' for one joint network"
    )
    p.add_argument("--epochs", type=_positive_int, default=200, help="epochs (default 200)")
    p.add_argument("--batch-size", type=_positive_int, default=200, help="mini-batch size (default 200)")
    p.add_argument(
        "--lr", type=_positive_float, default=None, help="base learning rate (default 5e-4 for 1 layer, 3e-4 deeper)"
    )
    p.add_argument("--momentum", type=_fraction, default=0.5, help="classical momentum (default 0.5)")
    p.add_argument(
        "--lr-decay", type=_positive_float, default=0.9, help="factor when the monitored MAE rises (default 0.9)"
    )
    p.add_argument("--lr-min", type=_positive_float, default=1e-5, help="learning-rate floor (default 1e-5)")
    p.add_argument(
        "--monitor-size",
        type=_positive_int,
        default=5000,
        help="training profiles monitored for the decay rule (default 5000)",
    )
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd (paper) or adamw")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument(
        "--precision", choices=("32", "tf32", "bf16-mixed"), default="32", help="numeric precision (default 32)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of initialisation, shuffling and dropout (default 0)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N")
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last.ckpt if present, to the same result as an uninterrupted run; a "
        "checkpoint that cannot be continued (it or its best_*.pt truncated, corrupt or missing; written for "
        "another dataset or other hyper-parameters; more epochs done than --epochs) is an error",
    )
    p.add_argument(
        "--restart-incompatible",
        action="store_true",
        help="with --resume: instead of that error, log why and train from scratch (the workflow passes this)",
    )
    p.add_argument("--keep-last", action="store_true", help="keep last.ckpt after success (default: delete it)")
    p.add_argument(
        "--gpu-lock-dir",
        default=None,
        help="folder of the GPU lease files shared by concurrent jobs (default: $DGEX_GPU_LOCK_DIR or "
        "<tmp>/dgex-gpu-locks-<uid>)",
    )
    p.add_argument(
        "--checkpoint-interval",
        type=_nonneg_float,
        default=60.0,
        help="seconds between resumable checkpoints (last.ckpt + best weights; default 60, 0 = every epoch)",
    )
    _add_no_progress(p)

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
    p.add_argument("--dataset", required=True, help="processed dataset from `dgex preprocess`")
    p.add_argument("--output-dir", required=True, help="run folder")
    p.add_argument(
        "--lambdas",
        type=_finite_float,
        nargs="+",
        default=None,
        metavar="L",
        help="penalty grid for ridge/lasso, per-sample scale: ridge (1/n)RSS + L|w|^2 "
        "(sklearn alpha = n_train*L), lasso (1/2n)RSS + L|w|_1 (sklearn alpha = L). "
        "Default ridge: logspace(-4, 2, 13); lasso: sqrt(2 ln(landmarks)/n_train) * 2^-(0.5..4.5)",
    )
    p.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        metavar="K",
        help="k grid for knn (default 1 2 3 5 10 15 20 30 50 100)",
    )
    p.add_argument(
        "--n-jobs",
        type=int,
        default=-1,
        help="threads for the per-gene lasso fits (default -1: all cores); other methods ignore it",
    )
    _add_no_progress(p)
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
    p.add_argument("--output-dir", required=True, help="aggregate folder")
    p.add_argument(
        "--dataset",
        default=None,
        help="processed dataset the runs were trained on: its target parts are what every grid point must have "
        "(default: the dataset named in the runs' run.json)",
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="aggregate grid points that lack target parts (and leave out unfinished run folders) instead of "
        "refusing; aggregate.json lists them and the tables and figures state them",
    )

    # ---------------------------------------------------------------- tables
    p = sub.add_parser(
        "tables",
        help="Tables 1-2, S2-S5 and the statistics table (CSV + Markdown)",
        description="Write table1 (GEO-te), table2 (GTEx-te), tableS2-S5 (all dropout rates on "
        "GEO-va, GEO-te, 1000G-va, GTEx-te) and table_stats, each as .csv and .md, "
        "plus tables.json. Dropout rates and architectures shown are chosen on validation.",
    )
    p.add_argument("--aggregate", required=True, help="folder written by `dgex aggregate`")
    p.add_argument("--output-dir", required=True, help="tables folder")
    p.add_argument("--paper-reference", action="store_true", help="print the paper's published numbers beside ours")
    p.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=2000,
        dest="n_boot",
        help="bootstrap resamples for the confidence intervals (default 2000)",
    )

    # ---------------------------------------------------------------- figures
    p = sub.add_parser(
        "figures",
        help="Figures 1-5 of the paper (PNG + PDF)",
        description="Draw Figures 1-5 from an aggregate folder, choosing the models shown on "
        "validation as the paper did; writes figures.json with captions.",
    )
    p.add_argument("--aggregate", required=True, help="folder written by `dgex aggregate`")
    p.add_argument("--output-dir", required=True, help="figures folder")

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
    q.add_argument("--dataset", required=True, help="processed dataset the network was trained on")
    q.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN_DIR",
        help="the part run folders of one network (written by `dgex train`)",
    )
    _add_selection(q, "which checkpoint to load")
    q.add_argument(
        "--split",
        default="geo-tr",
        help="profiles to fit and score on (default geo-tr, as in the paper; adjusted R² is in-sample)",
    )
    q.add_argument(
        "--max-samples",
        type=_positive_int,
        default=None,
        help="use a seeded random subset of this many profiles (default: all)",
    )
    q.add_argument("--seed", type=_seed, default=0, help="seed of the --max-samples subset (default 0)")
    q.add_argument("--batch-size", type=_positive_int, default=4096, help="profiles per streamed chunk (default 4096)")
    q.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N (default auto)")
    q.add_argument("--output-dir", required=True, help="folder for the S2 outputs")
    _add_no_progress(q)
    q = isub.add_parser(
        "s3",
        help="major-weight connectivity of a 1-hidden-layer network (Figure S3)",
        description="Keep the weights more than k standard deviations from the mean (per landmark "
        "for input->hidden, per target for hidden->output, as in the paper) and count "
        "the major connections of every hidden unit, landmark and target gene. Writes "
        "s3_hidden_in_degree.csv, s3_hidden_out_degree.csv, s3_landmark_out_degree.csv, "
        "s3_target_in_degree.csv, figure_s3.png/.pdf and s3.json.",
    )
    q.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN_DIR",
        help="the part run folders of one 1-hidden-layer network (paper: 3000x1)",
    )
    _add_selection(q, "which checkpoint to load")
    q.add_argument(
        "--sigmas",
        type=_positive_float,
        nargs="+",
        default=[4.0, 5.0],
        metavar="K",
        help="thresholds k (in standard deviations) applied to both weight matrices (default 4 5)",
    )
    q.add_argument(
        "--scope",
        choices=("unit", "matrix"),
        default="unit",
        help="mean/std per landmark and per target (unit, the paper) or per whole matrix",
    )
    q.add_argument(
        "--map-sigmas",
        type=_positive_float,
        nargs=2,
        default=[4.0, 5.0],
        metavar=("K_IN", "K_OUT"),
        help="thresholds of the connectivity map for input and output weights (default 4 5, the paper)",
    )
    q.add_argument(
        "--map-size",
        type=_positive_int,
        default=60,
        help="hidden units / genes shown in the connectivity map (default 60)",
    )
    q.add_argument(
        "--dataset", default=None, help="processed dataset (optional): checks the genes and adds gene symbols"
    )
    q.add_argument("--output-dir", required=True, help="folder for the S3 outputs")
    _add_no_progress(q)

    # ---------------------------------------------------------------- export
    p = sub.add_parser(
        "export",
        help="package the part networks of one trained grid point as a model bundle",
        description="Write a self-contained model bundle folder for `dgex infer`: bundle.json "
        "(format, architecture, training config, selection, metrics, checksums), "
        "weights_part<k>.pt, landmarks.tsv, targets.tsv and stats.npz (GEO statistics "
        "and quantile references). Written to a temporary folder and renamed into place.",
    )
    p.add_argument("--dataset", required=True, help="processed dataset the runs were trained on")
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
    _add_selection(p, "which best epoch to export")
    p.add_argument("--output", required=True, help="bundle folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    _add_no_progress(p)

    # ---------------------------------------------------------------- infer
    p = sub.add_parser(
        "infer",
        help="predict target genes for your landmark profiles with a model bundle",
        description="Map the input's rows (genes) onto the model's landmarks, standardise with the "
        "bundle's GEO statistics, predict every target part and write target expression "
        "(log2, GEO scale) for every input sample. GCTX input is streamed in chunks of "
        "samples and GCTX output written incrementally, so memory stays flat.",
    )
    p.add_argument("--model", required=True, help="model bundle folder written by `dgex export`")
    p.add_argument(
        "--input",
        required=True,
        help="genes x samples log2 expression: .gctx (streamed), .gct, .tsv or .csv (rows: landmark genes)",
    )
    p.add_argument(
        "--output", required=True, help="predictions: .gctx (any size), .csv/.tsv (small inputs; .gz to compress)"
    )
    p.add_argument(
        "--id-type",
        choices=("auto",) + ID_TYPES,
        default="auto",
        help="row ids of the input: ensembl, entrez, symbol or probe (L1000/HG-U133A, e.g. 200814_at); "
        "auto (default) picks the type that matches the most landmarks",
    )
    p.add_argument(
        "--format",
        dest="output_format",
        choices=("gctx", "csv", "tsv"),
        default=None,
        help="output format (default: from the --output extension, which must agree with it: "
        ".gctx/.h5, .csv[.gz], .tsv/.txt[.gz])",
    )
    p.add_argument("--chunk-size", type=_positive_int, default=4096, help="input samples read per chunk (default 4096)")
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="samples predicted and written per batch; bounds memory (default: about 64 MB of "
        "output per batch, 256..8192 samples)",
    )
    p.add_argument(
        "--impute-missing",
        choices=("none", "mean"),
        default="none",
        help="landmarks absent from the input: none (default) = error listing them; mean = fill with "
        "the GEO training mean and warn (at least 50%% must be present)",
    )
    p.add_argument(
        "--quantile-normalize",
        action="store_true",
        help="rank-map each sample onto the GEO landmark reference first; use for inputs whose value "
        "distribution differs from GEO's quantile-normalised log2 arrays (other platforms or "
        "normalisations), not for inputs already on the GEO scale",
    )
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:N (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--force", action="store_true", help="allow csv/tsv output above 20,000 samples")
    _add_no_progress(p)

    # ---------------------------------------------------------------- gpus
    p = sub.add_parser(
        "gpus",
        help="list visible GPUs and which are leased by dgex jobs",
        description="Show each GPU this process may use (DGEX_GPUS, nvidia-smi, CUDA_VISIBLE_DEVICES) "
        "and whether a dgex training job holds its lease.",
    )
    p.add_argument("--lock-dir", default=None, help="lease folder (default as for `dgex train`)")

    return parser


def _part(text: str):
    if text == "all":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a part number >= 0 or 'all', got {value}")
    return value


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


def _dispatch(args: argparse.Namespace) -> int | None:
    kwargs = {k.replace("-", "_"): v for k, v in vars(args).items() if k not in ("command", "verbose")}
    if args.command == "demo-data":
        from .demo import generate

        generate(**kwargs)
    elif args.command == "acquire":
        from .acquire import download

        download(**kwargs)
    elif args.command == "preprocess":
        from .preprocess import preprocess

        kwargs["dedup"] = not kwargs.pop("no_dedup")
        preprocess(**kwargs)
    elif args.command == "train":
        from .train import train

        train(**kwargs)
    elif args.command == "aggregate":
        from .aggregate import aggregate

        aggregate(**kwargs)
    elif args.command == "tables":
        from .tables import make_tables

        make_tables(**kwargs)
    elif args.command == "figures":
        from .figures import make_figures

        make_figures(**kwargs)
    elif args.command == "gpus":
        from .devices import lease_status

        rows = lease_status(args.lock_dir)
        if not rows:
            print("no GPU visible: training runs on the CPU")
        for r in rows:
            print(f"GPU {r['gpu']}: " + (f"leased by {r['holder']}" if r["leased"] else "free"))
    elif args.command == "interpret":
        from .interpret import interpret_s2, interpret_s3

        (interpret_s2 if kwargs.pop("analysis") == "s2" else interpret_s3)(**kwargs)
    elif args.command == "export":
        from .bundle import export_bundle

        export_bundle(**kwargs)
    elif args.command == "infer":
        from .infer import infer

        infer(**kwargs)
    elif args.command == "baseline":
        from .baselines import run_baseline

        run_baseline(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
