"""Benchmark `dgex infer`: throughput against the disk's write bandwidth, and peak memory versus input size.

Builds a model bundle of a demo-sized network with random weights (the real
943 D-GEX landmarks -> ``--targets`` targets in 2 parts, ``--layers`` x
``--units``), writes synthetic L1000-like GCTX inputs (the 978 L1000 landmark
probes x N profiles, streamed block by block so generation memory stays
bounded), and runs the real `dgex infer` CLI on each in a fresh process,
measuring:

* wall time of the whole command (Python + torch start-up included) plus an
  ``fsync`` of its output, so the bytes are on disk as in the bandwidth test;
* profiles/s, and the marginal profiles/s between the smallest and largest
  size (start-up cost cancels out);
* peak resident memory of the child (``os.wait4`` rusage ``ru_maxrss``);
* the disk's write bandwidth for the same number of bytes as the output
  matrix (``ndarray.tofile`` in 64 MB blocks + ``fsync``, best of two), in
  the same folder.

Peak memory is bounded by the pipeline (``--chunk-size`` input samples read
one chunk ahead, three output batches of ~64 MB), not by the number of
profiles; the smallest size may stay below that bound when it is one chunk.

Goals: output throughput >= 50% of the write bandwidth, peak memory <= 2 GB
and flat from 10k to 100k profiles.

    python bench/infer.py                            # 10k, 30k, 100k profiles, 2,000 targets (~1 min)
    python bench/infer.py --sizes 5000 50000 --targets 9520
    python bench/infer.py --targets 21290 --units 3000 --device cuda
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dgex.bundle import write_bundle
from dgex.genes import data_path, read_gene_map
from dgex.io import GCTXWriter
from dgex.models import DGEX

GOAL_FRACTION = 0.5
GOAL_MEMORY_MB = 2048


def build_bundle(path: Path, n_targets: int, layers: int, units: int, seed: int = 0) -> None:
    """A bundle with the real landmark genes, ``n_targets`` targets in 2 parts and random weights."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    lm = read_gene_map(data_path("map_lm.txt"))
    landmarks = pd.DataFrame(
        {"ensembl": lm["ensembl"], "entrez": "", "symbol": lm["symbol"], "probe": lm["probes"].map(lambda p: p[0])}
    )
    L = len(landmarks)
    tg_map = read_gene_map(data_path("map_tg.txt"))
    if n_targets <= len(tg_map):
        ens, sym = tg_map["ensembl"].values[:n_targets], tg_map["symbol"].values[:n_targets]
    else:  # beyond the D-GEX map (e.g. the paper's 21,290 L1000 targets): synthetic ids
        ens = [f"ENSGSYN{i:08d}" for i in range(n_targets)]
        sym = [f"SYN{i}" for i in range(n_targets)]
    half = n_targets // 2
    part = np.repeat([0, 1], [half, n_targets - half])
    targets = pd.DataFrame({"ensembl": ens, "entrez": "", "symbol": sym, "part": part})
    nets = []
    for k, n in enumerate((half, n_targets - half)):
        net = DGEX(L, n, layers, units)
        with torch.no_grad():  # random output weights of a trained-like size, not the 1e-4 initialisation
            net.output.weight.normal_(0, 1 / np.sqrt(units))
        nets.append((k, net))
    lm_mean = rng.uniform(5, 11, L)
    stats = {
        "landmark_mean": lm_mean,
        "landmark_std": rng.uniform(0.3, 1.5, L),
        "target_mean": rng.uniform(3, 12, n_targets),
        "target_std": rng.uniform(0.2, 2.0, n_targets),
        "epsilon": 1e-3,
        "standardize": "transductive",
        "gene_quantiles": np.sort(rng.uniform(3, 13, L + n_targets)),
        "landmark_quantiles": np.sort(lm_mean),
    }
    write_bundle(
        path,
        networks=nets,
        landmarks=landmarks,
        targets=targets,
        stats=stats,
        overwrite=True,
        extra={"selection": "geo-va", "note": "benchmark bundle, random weights"},
    )


def write_input(path: Path, n: int, seed: int = 1, block: int = 10_000) -> None:
    """L1000-like level-3 input: 978 landmark probes x ``n`` profiles of log2 values, written in blocks."""
    probes = pd.read_csv(data_path("l1000_landmarks.tsv"), sep="\t", dtype=str)["pr_id"].tolist()
    rng = np.random.default_rng(seed)
    mu = rng.uniform(5, 11, len(probes)).astype(np.float32)
    load = rng.normal(scale=0.5, size=(6, len(probes))).astype(np.float32)
    with GCTXWriter(path, probes, [f"P{i:08d}" for i in range(n)]) as w:
        for s in range(0, n, block):
            k = min(block, n - s)
            z = rng.standard_normal((k, 6), dtype=np.float32)
            w.write(np.clip(mu + z @ load + rng.standard_normal((k, len(probes)), dtype=np.float32) * 0.3, 2, 15))


def matmul_gflops(n_in: int, units: int, n_out: int, batch: int = 4096, seconds: float = 1.0) -> float:
    """This device's float32 matmul rate (GFLOP/s) on the network's own layer shapes (CPU)."""
    x, w1, w2 = torch.randn(batch, n_in), torch.randn(n_in, units), torch.randn(units, n_out)
    flops, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        torch.mm(torch.mm(x, w1), w2)
        flops += 2 * batch * (n_in * units + units * n_out)
    return flops / (time.perf_counter() - t) / 1e9


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bandwidth(path: Path, n_bytes: int, block_mb: int = 64) -> float:
    """Bytes/s for writing ``n_bytes`` with ``ndarray.tofile`` in blocks, then ``fsync``."""
    block = np.random.default_rng(0).standard_normal(block_mb * (1 << 20) // 4, dtype=np.float32)
    t = time.perf_counter()
    with open(path, "wb") as fh:
        left = n_bytes
        while left > 0:
            part = block[: min(len(block), left // 4 or 1)]
            part.tofile(fh)
            left -= part.nbytes
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t
    path.unlink()
    return n_bytes / seconds


def run_infer(bundle: Path, inp: Path, out: Path, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "dgex",
        "infer",
        "--model",
        str(bundle),
        "--input",
        str(inp),
        "--output",
        str(out),
        "--chunk-size",
        str(args.chunk_size),
        "--device",
        args.device,
        "--overwrite",
        "--no-progress",
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"dgex infer failed ({proc.returncode}):\n{stderr}")
    fsync_file(out)
    wall = time.perf_counter() - t
    m = re.search(r"samples .* in ([0-9.]+) s", stderr)
    return {
        "wall_s": wall,
        "infer_s": float(m.group(1)) if m else float("nan"),
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "output_bytes": out.stat().st_size,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10_000, 30_000, 100_000],
        help="profiles per input (default 10k 30k 100k)",
    )
    ap.add_argument(
        "--targets",
        type=int,
        default=2000,
        help="target genes (default 2000; the paper: 9520, or 21290 for its L1000 model)",
    )
    ap.add_argument("--layers", type=int, default=1, help="hidden layers (default 1)")
    ap.add_argument("--units", type=int, default=300, help="hidden units (default 300)")
    ap.add_argument(
        "--chunk-size", type=int, default=4096, help="dgex infer --chunk-size (default 4096, as dgex infer)"
    )
    ap.add_argument("--batch-size", type=int, default=None, help="dgex infer --batch-size (default: its auto size)")
    ap.add_argument("--device", default="auto", help="dgex infer --device (default auto)")
    ap.add_argument("--workdir", default=None, help="folder for the files (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args(argv)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="dgex-bench-infer-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = work / "bundle"
    build_bundle(bundle, args.targets, args.layers, args.units)
    half = args.targets // 2
    flops = sum(DGEX(943, n, args.layers, args.units).flops_per_sample() for n in (half, args.targets - half))
    gflops = (
        matmul_gflops(943, args.units, half)
        if args.device in ("auto", "cpu") and not torch.cuda.is_available()
        else float("nan")
    )
    print(
        f"bundle: 943 landmarks -> {args.targets} targets in 2 parts, {args.layers} x {args.units} units, "
        f"random weights; device {args.device}; torch threads {torch.get_num_threads()}; workdir {work}"
    )
    rows = []
    for n in sorted(args.sizes):
        inp, out = work / f"in_{n}.gctx", work / f"out_{n}.gctx"
        t = time.perf_counter()
        write_input(inp, n)
        gen = time.perf_counter() - t
        r = run_infer(bundle, inp, out, args)
        # best of two: the shared disk is noisy, and the best case is the stricter comparison
        bw = max(write_bandwidth(work / f"bw_{n}.bin", r["output_bytes"]) for _ in range(2))
        r.update(n=n, gen_s=gen, write_bw=bw, input_mb=inp.stat().st_size / 1e6)
        rows.append(r)
        print(
            f"  {n:>8,} profiles: input {r['input_mb']:.0f} MB generated in {gen:.1f} s; infer {r['wall_s']:.1f} s",
            flush=True,
        )
        if not args.keep:
            inp.unlink()
            out.unlink()

    print()
    head = (
        f"{'profiles':>9} {'wall s':>7} {'infer s':>8} {'profiles/s':>11} {'output MB':>10} {'out MB/s':>9} "
        f"{'disk MB/s':>10} {'% of disk':>9} {'peak RSS MB':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        mbps = r["output_bytes"] / r["wall_s"] / 1e6
        print(
            f"{r['n']:>9,} {r['wall_s']:>7.1f} {r['infer_s']:>8.1f} {r['n'] / r['wall_s']:>11,.0f} "
            f"{r['output_bytes'] / 1e6:>10.0f} {mbps:>9.0f} {r['write_bw'] / 1e6:>10.0f} "
            f"{100 * mbps * 1e6 / r['write_bw']:>8.0f}% {r['peak_rss_mb']:>12.0f}"
        )
    big, small = rows[-1], rows[0]
    frac = big["output_bytes"] / big["wall_s"] / big["write_bw"]
    print()
    if len(rows) > 1:
        dt = big["wall_s"] - small["wall_s"]
        marginal = (big["n"] - small["n"]) / dt if dt > 0 else float("nan")
        mb = (big["output_bytes"] - small["output_bytes"]) / dt / 1e6 if dt > 0 else float("nan")
        print(
            f"marginal throughput {small['n']:,} -> {big['n']:,}: {marginal:,.0f} profiles/s "
            f"({mb:.0f} MB/s of output, {100 * mb * 1e6 / big['write_bw']:.0f}% of the disk's write bandwidth)"
        )
        print(
            f"peak memory {small['peak_rss_mb']:.0f} MB -> {big['peak_rss_mb']:.0f} MB "
            f"(x{big['peak_rss_mb'] / small['peak_rss_mb']:.2f} for x{big['n'] / small['n']:.0f} profiles)"
        )
    ceiling = gflops * 1e9 / flops * 4 * args.targets  # output bytes/s if the matmuls alone set the pace
    if ceiling == ceiling:
        print(
            f"compute ceiling: {flops / 1e6:.2f} MFLOP per profile at {gflops:.0f} GFLOP/s (this CPU's matmul rate) "
            f"= {gflops * 1e9 / flops:,.0f} profiles/s = {ceiling / 1e6:.0f} MB/s of output "
            f"({100 * ceiling / big['write_bw']:.0f}% of the disk's write bandwidth)"
        )
    peak = max(r["peak_rss_mb"] for r in rows)
    print(
        f"goal throughput >= {GOAL_FRACTION:.0%} of write bandwidth at {big['n']:,}: "
        f"{'met' if frac >= GOAL_FRACTION else 'NOT met'} ({frac:.0%})"
    )
    print(f"goal peak memory <= {GOAL_MEMORY_MB} MB: {'met' if peak <= GOAL_MEMORY_MB else 'NOT met'} ({peak:.0f} MB)")
    if not args.keep:
        shutil.rmtree(bundle)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
