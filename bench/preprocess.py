"""Benchmark `dgex preprocess` at scaled sizes and extrapolate to the paper's 129,158 x 22,283 GEO input.

Writes synthetic probe-level GCTX files with every HG-U133A probe (22,283 rows)
and the real D-GEX gene maps (943 landmarks, 9,520 targets), runs the real
`dgex preprocess` CLI on each in a fresh process, and reports wall time per
phase and the process's peak resident memory (ru_maxrss).

Extrapolation: the streamed phases are linear in the number of samples; the
within-cluster de-duplication is quadratic in cluster size (n^2 / K for K
clusters of similar size), so it is scaled by (N / n)^2.  Peak memory is bounded
by the chunk size and the de-duplication budget, not by N: the two sizes show
whether it stays flat.

    python bench/preprocess.py                 # 2,500, 5,000 and 10,000 samples (~2 min)
    python bench/preprocess.py --sizes 2000 8000 --chunk-size 2048
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dgex.genes import probe_annotation
from dgex.io import GCTXWriter
from dgex.preprocess import find_duplicates

PAPER_SAMPLES = 129_158
PAPER_PROBES = 22_283


def write_synthetic(path: Path, n_samples: int, seed: int = 0, block: int = 1000) -> None:
    """Probe-level log2 matrix ``(n_samples, 22283)`` with a low-rank structure, written in blocks."""
    probes = list(probe_annotation().index)
    rng = np.random.default_rng(seed)
    loadings = rng.normal(scale=0.6, size=(8, len(probes))).astype(np.float32)
    mu = rng.uniform(4, 12, size=len(probes)).astype(np.float32)
    samples = [f"GSM{i:07d}" for i in range(n_samples)]
    with GCTXWriter(path, probes, samples) as w:
        for s in range(0, n_samples, block):
            k = min(block, n_samples - s)
            z = rng.normal(size=(k, 8)).astype(np.float32)
            w.write(np.clip(mu + z @ loadings + rng.normal(scale=0.3, size=(k, len(probes))), 0, 16))


def run_one(n: int, workdir: Path, chunk_size: int, memory_mb: int) -> dict:
    geo = workdir / f"geo_{n}.gctx"
    t = time.time()
    write_synthetic(geo, n)
    gen_s = time.time() - t
    out = workdir / f"ds_{n}.h5"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dgex",
            "preprocess",
            "--geo",
            str(geo),
            "--output",
            str(out),
            "--chunk-size",
            str(chunk_size),
            "--memory-mb",
            str(memory_mb),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    wall = time.time() - t
    if proc.returncode:
        sys.exit(f"preprocess failed on {n} samples:\n{proc.stderr}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(out.with_suffix(".json").read_text())
    geo.unlink()
    out.unlink()
    return {
        "n": n,
        "generate_s": gen_s,
        "wall_s": wall,
        "peak_rss_mb": max(peak_kb, before) / 1024,
        "timings": summary["timings"],
        "removed": summary["duplicates_removed"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000], help="GEO sample counts to run")
    ap.add_argument(
        "--chunk-size",
        type=int,
        default=1000,
        help="samples per streamed chunk (default 1000, below the sizes so that streaming is exercised)",
    )
    ap.add_argument("--memory-mb", type=int, default=256, help="de-duplication memory budget (default 256)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        # peak RSS of children is a high-water mark: run sizes in increasing order and report each
        rows = [run_one(n, Path(tmp), args.chunk_size, args.memory_mb) for n in sorted(args.sizes)]
    print(
        f"dgex preprocess benchmark: {PAPER_PROBES} probes, 943 landmarks + 9,520 targets, "
        f"--chunk-size {args.chunk_size} --memory-mb {args.memory_mb}"
    )
    print(f"{'samples':>8} {'wall s':>8} {'dedup s':>8} {'other s':>8} {'peak RSS MB':>12}")
    for r in rows:
        dedup = r["timings"].get("dedup", 0.0)
        print(f"{r['n']:>8} {r['wall_s']:>8.1f} {dedup:>8.1f} {r['wall_s'] - dedup:>8.1f} {r['peak_rss_mb']:>12.0f}")
    big = rows[-1]
    scale = PAPER_SAMPLES / big["n"]
    in_process = sum(big["timings"].values())  # excludes interpreter start-up (a fixed cost)
    # pairwise de-duplication at paper scale: K clusters of ~N/K profiles each, measured on one such cluster
    k = 100
    m = PAPER_SAMPLES // k
    x = np.random.default_rng(1).normal(size=(m, 943 + 9520)).astype(np.float32)
    t = time.time()
    find_duplicates(x, 1.0)
    cluster_s = time.time() - t
    est = in_process * scale + cluster_s * k
    print(
        f"extrapolation to {PAPER_SAMPLES:,} x {PAPER_PROBES:,}: streamed phases {in_process:.1f} s at "
        f"{big['n']:,} samples x {scale:.1f} = {in_process * scale / 60:.1f} min; pairwise de-duplication "
        f"{cluster_s:.2f} s per {m:,}-profile cluster x {k} clusters = {cluster_s * k / 60:.1f} min; "
        f"total ~{est / 60:.0f} min on this machine (2 cores)"
    )
    if len(rows) > 1:
        ratio = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]
        print(
            f"peak memory ratio {rows[-1]['n']}/{rows[0]['n']} samples: {ratio:.2f} "
            f"(1.0 = flat: memory is bounded by --chunk-size and --memory-mb, not by the number of samples)"
        )


if __name__ == "__main__":
    main()
