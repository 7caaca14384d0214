"""Shared fixtures: tiny gene maps and probe-level GCTX files built in the test's tmp dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dgex.io import write_gctx

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_dgex(*args, cwd=None):
    """Run the `dgex` CLI in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "dgex", *map(str, args)], capture_output=True, text=True, cwd=cwd)


def train_argv(dataset, output_dir=None, **flags) -> list:
    """``dgex train`` arguments: ``flag_name=value`` becomes ``--flag-name value``, ``flag_name=True`` a bare flag."""
    argv = ["train", "--dataset", dataset] + ([] if output_dir is None else ["--output-dir", output_dir])
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


@pytest.fixture
def keep_torch_threads():
    """Restore torch's process-wide thread count after the test.

    ``train(threads=1)`` sets it (tiny nets on a shared CPU are fastest on one thread); the tests of other
    modules must not inherit that.
    """
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_maps(tmp_path):
    """12 landmark genes (one probe each) and 30 target genes (1-3 probes), 4 targets overlap landmarks."""
    lm = [(f"LM{i}", f"ENSG9000000{i:04d}", f"lm{i}_at") for i in range(12)]
    tg = []
    for i in range(30):
        ens = lm[i][1] if i < 4 else f"ENSG9100000{i:04d}"  # first 4 are also landmarks
        probes = ",".join(f"tg{i}_{k}_at" for k in range(1 + i % 3))
        tg.append((f"TG{i}" if i >= 4 else lm[i][0], ens, probes))
    lm_path, tg_path = tmp_path / "map_lm.txt", tmp_path / "map_tg.txt"
    lm_path.write_text("".join("\t".join(r) + "\n" for r in lm))
    tg_path.write_text("".join("\t".join(r) + "\n" for r in tg))
    probes = [r[2] for r in lm] + [p for r in tg for p in r[2].split(",")]
    return {"landmarks": lm_path, "targets": tg_path, "probes": probes, "lm": lm, "tg": tg}


def make_geo(path, probes, n_samples=200, seed=0, n_dups=0, extra_probes=5, scale="log2"):
    """Probe-level GCTX ``(n_samples + n_dups, n_probes)`` with correlated log2 values.

    Returns ``(data, probe_ids, sample_ids, dup_pairs)``.
    """
    rng = np.random.default_rng(seed)
    ids = list(probes) + [f"extra{i}_at" for i in range(extra_probes)]
    z = rng.normal(size=(n_samples, 3))
    load = rng.normal(size=(3, len(ids)))
    data = 8 + z @ load * 0.8 + rng.normal(scale=0.3, size=(n_samples, len(ids)))
    pairs = []
    if n_dups:
        src = rng.choice(n_samples, size=n_dups, replace=False)
        dups = data[src] + rng.normal(scale=0.01, size=(n_dups, len(ids)))
        data = np.vstack([data, dups])
        pairs = [(int(s), n_samples + k) for k, s in enumerate(src)]
    if scale == "linear":
        data = 2**data
    samples = [f"S{i:05d}" for i in range(len(data))]
    write_gctx(path, data.astype(np.float32), ids, samples)
    return data.astype(np.float32), ids, samples, pairs


@pytest.fixture
def shared_data():
    if not SHARED_DATA.exists():
        pytest.skip(f"real reference data not present at {SHARED_DATA}")
    return SHARED_DATA


def assert_one_line_error(res, *fragments):
    """A failed CLI call: exit 2, one `dgex: error:` line (the last), no traceback."""
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("dgex: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]
