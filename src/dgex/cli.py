"""The ``dgex`` command line: one sub-command per pipeline stage.

This module only parses arguments and calls one function per verb; the work
lives in the stage modules.  A :class:`~dgex.errors.DgexError` becomes a
one-line ``dgex: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


ID_TYPES = ("ensembl", "entrez", "symbol", "probe")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgex",
        description="D-GEX: infer target gene expression from landmark genes with deep learning.",
    )
    parser.add_argument("--version", action="version", version=f"dgex {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ---------------------------------------------------------------- demo-data
    p = sub.add_parser("demo-data", help="generate the embedded synthetic demo inputs (GEO-, 1000G-, GTEx-like)",
                       description="Write seeded synthetic inputs shaped like the real ones: a probe-level HG-U133A "
                                   "GCTX (geo.gctx), a GEUVADIS-like RPKM table (1000g.tsv.gz) and a GTEx-like "
                                   "gene-level GCTX (gtex.gctx), plus demo.json describing them.")
    p.add_argument("--output-dir", required=True, help="folder to write the files into")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-geo", type=_positive_int, default=2000, help="distinct GEO-like profiles (default 2000)")
    p.add_argument("--n-duplicates", type=_nonneg_int, default=100,
                   help="planted near-duplicate GEO profiles for de-duplication to find (default 100)")
    p.add_argument("--n-1000g", type=_positive_int, default=150, help="1000G-like RNA-seq samples (default 150)")
    p.add_argument("--n-gtex", type=_positive_int, default=300, help="GTEx-like RNA-seq samples (default 300)")
    p.add_argument("--n-latent", type=_positive_int, default=12, help="shared latent factors (default 12)")
    p.add_argument("--noise", type=_positive_float, default=0.25, help="gene-level noise s.d. in log2 units (default 0.25)")
    p.add_argument("--max-targets", type=_positive_int, default=None,
                   help="use a seeded subset of this many target genes (default: all 9,520)")
    p.add_argument("--target-seed", type=int, default=0, help="seed of the target-gene subset (default 0)")

    # ---------------------------------------------------------------- acquire
    p = sub.add_parser("acquire", help="download one input file (resumable, verified, atomic)",
                       description="Download URL to OUTPUT with a progress bar, resuming a partial download, "
                                   "verifying size and SHA-256 when given, and renaming into place only when complete.")
    p.add_argument("--url", required=True, help="http(s) or file:// URL")
    p.add_argument("--output", required=True, help="destination file")
    p.add_argument("--sha256", default=None, help="expected SHA-256 hex digest (recommended)")
    p.add_argument("--size", type=_nonneg_int, default=None, help="expected size in bytes")
    p.add_argument("--timeout", type=_positive_float, default=60.0, help="network timeout in seconds (default 60)")
    p.add_argument("--retries", type=_nonneg_int, default=5, help="retries after a broken connection (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    # ---------------------------------------------------------------- preprocess
    p = sub.add_parser("preprocess", help="build one processed dataset (splits, halves, statistics) from raw inputs",
                       description="Probe->gene means, optional quantile normalisation, MiniBatchKMeans "
                                   "de-duplication, RNA-seq quantile mapping onto the GEO reference, per-gene "
                                   "standardisation, seeded splits and target parts; streams the GEO input in chunks.")
    p.add_argument("--geo", required=True, help="GEO probe-level HG-U133A matrix (.gctx, .gct, .tsv)")
    p.add_argument("--geo-quantile-normalize", action="store_true",
                   help="quantile normalise GEO samples first (for inputs that are not yet normalised)")
    p.add_argument("--geo-log2", action="store_true", help="log2(x+1)-transform GEO values first (linear-scale input)")
    p.add_argument("--g1000", default=None, help="1000G RNA-seq gene-level matrix (cross-platform validation); optional")
    p.add_argument("--g1000-id-type", choices=ID_TYPES, default="ensembl", help="gene ids of --g1000 rows (default ensembl)")
    p.add_argument("--gtex", default=None, help="GTEx RNA-seq gene-level matrix (cross-platform test); optional")
    p.add_argument("--gtex-id-type", choices=ID_TYPES, default="ensembl", help="gene ids of --gtex rows (default ensembl)")
    p.add_argument("--landmarks", default="builtin", help="landmark gene map (default: builtin map_lm.txt)")
    p.add_argument("--targets", default="builtin", help="target gene map (default: builtin map_tg.txt)")
    p.add_argument("--max-targets", type=_positive_int, default=None, help="seeded subset of target genes (default all)")
    p.add_argument("--target-seed", type=int, default=0, help="seed of the target subset (default 0)")
    p.add_argument("--target-parts", type=_positive_int, default=2, help="random target parts, one network each (default 2)")
    p.add_argument("--part-seed", type=int, default=0, help="seed of the target partition (default 0)")
    p.add_argument("--no-dedup", action="store_true", help="skip duplicate removal")
    p.add_argument("--dedup-clusters", type=_positive_int, default=100, help="MiniBatchKMeans K (default 100)")
    p.add_argument("--dedup-threshold", type=float, default=1.0, help="Euclidean distance below which two profiles are duplicates (default 1.0)")
    p.add_argument("--standardize", choices=("transductive", "inductive"), default="transductive",
                   help="GEO statistics over all profiles (paper) or the training split only")
    p.add_argument("--epsilon", type=_positive_float, default=1e-3, help="(x - mean) / (std + epsilon) (default 1e-3)")
    p.add_argument("--va-fraction", type=_fraction, default=0.1, help="GEO validation fraction (default 0.1)")
    p.add_argument("--te-fraction", type=_fraction, default=0.1, help="GEO test fraction (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the GEO split (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of MiniBatchKMeans (default 0)")
    p.add_argument("--chunk-size", type=_positive_int, default=4096, help="GEO samples per streamed chunk (default 4096)")
    p.add_argument("--memory-mb", type=_positive_int, default=2048, help="memory budget for de-duplication blocks (default 2048)")
    p.add_argument("--output", required=True, help="processed dataset (.h5)")
    p.add_argument("--summary", default=None, help="JSON summary (default: OUTPUT with .json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _dispatch(args) or 0
    except DgexError as exc:
        print(f"dgex: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgex: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int | None:
    kwargs = {k.replace("-", "_"): v for k, v in vars(args).items() if k not in ("command", "verbose")}
    if args.command == "demo-data":
        from .demo import generate
        generate(**kwargs)
    elif args.command == "acquire":
        from .acquire import download
        kwargs["progress"] = not kwargs.pop("no_progress")
        download(**kwargs)
    elif args.command == "preprocess":
        from .preprocess import preprocess
        kwargs["progress"] = not kwargs.pop("no_progress")
        kwargs["dedup"] = not kwargs.pop("no_dedup")
        preprocess(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
