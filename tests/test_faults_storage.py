"""Storage faults and interrupted runs (issue 11, items 3, 4, 6 and 8).

Every verb meets a full disk, a read-only file system, a file where a folder
must be and a folder where a file must be with one ``dgex: error:`` line
(exit 2) and no temporary file left; HDF5 writers survive a failed write
without crashing the interpreter; a run killed with SIGKILL at several points
is completed by the same command with identical results and no leftovers;
SIGTERM cleans up.  Also: repeated sample names in text inputs, output names
whose extension promises another format, flat samples and constant genes.

Real faults where possible: a small tmpfs and a read-only tmpfs (root only;
skipped with the reason otherwise) and RLIMIT_FSIZE (any user), which makes
the kernel refuse writes beyond a size, so HDF5 really fails mid-file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dgex.io as dio  # noqa: E402
from conftest import assert_one_line_error, make_geo  # noqa: E402
from dgex.cli import main  # noqa: E402
from dgex.errors import ConfigError, InputError  # noqa: E402
from dgex.io import open_matrix, write_gctx, write_tsv  # noqa: E402
from helpers_dataset import write_toy_dataset  # noqa: E402

N_LANDMARKS, N_TARGETS = 20, 200


# --------------------------------------------------------------------------- helpers
def _cli(*args, env=None, preexec_fn=None, timeout=300):
    """The CLI in a subprocess (a crash or hang there cannot take pytest with it)."""
    return subprocess.run(
        [sys.executable, "-m", "dgex", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=preexec_fn,
        timeout=timeout,
    )


def _main(capsys, *args):
    """The CLI in this process (fast); returns what :func:`assert_one_line_error` needs."""
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)


def _no_crash(res):
    assert res.returncode >= 0 and res.returncode < 128, f"killed by a signal ({res.returncode}): {res.stderr[-3000:]}"
    assert "Fatal Python error" not in res.stderr and "Segmentation fault" not in res.stderr, res.stderr[-3000:]


def _hidden(folder) -> list[str]:
    """Hidden entries below ``folder``: dgex's temporary files and folders all start with a dot."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob(".*"))


def _file_size_limit(nbytes: int):
    """preexec_fn: the kernel refuses writes beyond ``nbytes`` (EFBIG; SIGXFSZ ignored) -- a real I/O failure."""

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return apply


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    """Mount a tmpfs at ``path`` (root only); always unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); not root here")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {res.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _input_gctx(path, landmark_ids, n, seed=0):
    x = np.random.default_rng(seed).normal(8.0, 1.0, size=(n, len(landmark_ids))).astype(np.float32)
    write_gctx(path, x, landmark_ids, [f"S{i:05d}" for i in range(n)])
    return x


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy dataset, two trained part runs, a baseline run, an exported bundle and inputs for it."""
    from dgex.bundle import export_bundle
    from dgex.dataset import ProcessedDataset
    from dgex.train import train

    root = tmp_path_factory.mktemp("storage")
    ds = write_toy_dataset(
        root / "toy.h5", n_tr=100, n_landmarks=N_LANDMARKS, n_targets=N_TARGETS, n_va=20, n_te=20, n_parts=2
    )["path"]
    runs = []
    for p in (0, 1):
        train(
            dataset=ds,
            output_dir=root / f"part{p}",
            layers=1,
            units=4,
            dropout=0.0,
            part=p,
            epochs=1,
            batch_size=50,
            lr=0.01,
            monitor_size=20,
            progress=False,
            device="cpu",
            checkpoint_interval=0,
            seed=p,
        )
        runs.append(root / f"part{p}")
    assert main(["baseline", "lr", "--dataset", str(ds), "--output-dir", str(root / "bl"), "--no-progress"]) == 0
    agg = root / "agg"
    assert (
        main(
            ["aggregate", "--dgex-runs", *map(str, runs), "--baseline-runs", str(root / "bl"), "--output-dir", str(agg)]
        )
        == 0
    )
    export_bundle(dataset=ds, runs=runs, output=root / "bundle", progress=False)
    with ProcessedDataset(ds) as d:
        landmark_ids = list(d.genes().landmarks["ensembl"])
    _input_gctx(root / "small.gctx", landmark_ids, 400)
    _input_gctx(root / "big.gctx", landmark_ids, 2000, seed=1)  # 2000 x 200 float32 predictions: 1.6 MB
    return SimpleNamespace(
        root=root, dataset=ds, runs=runs, agg=agg, bundle=root / "bundle", landmarks=landmark_ids,
        small=root / "small.gctx", big=root / "big.gctx",
    )  # fmt: skip


# --------------------------------------------------------------------------- leftovers: names and the sweep
def test_temp_names_carry_host_and_pid(tmp_path):
    t = dio.temp_path(tmp_path / "x.gctx")
    assert t.parent == tmp_path and t.name == f".x.gctx~{dio.HOST}~{os.getpid()}.tmp"
    assert dio.temp_path(tmp_path / "d.h5", "work.h5").name.endswith(f"~{os.getpid()}.work.h5")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_sweep_removes_what_dead_runs_left_and_nothing_else(tmp_path):
    out = tmp_path / "x.gctx"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        names = {
            "dead": f".x.gctx~{dio.HOST}~{dead}.tmp",
            "dead_work": f".x.gctx~{dio.HOST}~{dead}.work.h5",
            "dead_dir": f".x.gctx~{dio.HOST}~{dead}.old",
            "legacy": f".x.gctx.{dead}.tmp",  # dgex before host names
            "own_pid": f".x.gctx~{dio.HOST}~{os.getpid()}.tmp",  # our pid, but not ours: a dead run's, reused
            "live": f".x.gctx~{dio.HOST}~{live.pid}.tmp",
            "reused": f".x.gctx~{dio.HOST}~{live.pid}.work.h5",  # live pid, process younger than the file
            "other_host_new": f".x.gctx~elsewhere.example~{dead}.tmp",
            "other_host_old": f".x.gctx~elsewhere.example~{dead}.work.h5",
            "other_output": f".x.gctx.gz~{dio.HOST}~{dead}.tmp",  # another output's temporary file
            "not_ours": ".x.gctx.notes",
        }
        for key, name in names.items():
            p = tmp_path / name
            (p.mkdir() if key == "dead_dir" else p.write_text(key))
        (tmp_path / names["dead_dir"] / "inner").write_text("x")
        long_ago = time.time() - 2 * 3600
        os.utime(tmp_path / names["reused"], (long_ago, long_ago))
        old = time.time() - dio.STALE_AGE_S - 3600
        os.utime(tmp_path / names["other_host_old"], (old, old))
        removed = {p.name for p in dio.sweep_stale(out)}
        expect = {names[k] for k in ("dead", "dead_work", "dead_dir", "legacy", "own_pid", "reused", "other_host_old")}
        assert removed == expect
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names[k] for k in ("live", "other_host_new", "other_output", "not_ours")}
    finally:
        live.kill()
        live.wait()


def test_sweep_spares_the_temp_file_this_process_is_writing(tmp_path):
    out = tmp_path / "y.csv"
    with dio.atomic_path(out) as tmp:
        tmp.write_text("half")
        assert dio.sweep_stale(out) == [] and tmp.exists()
    assert out.read_text() == "half" and _hidden(tmp_path) == []


# --------------------------------------------------------------------------- disk full: real ENOSPC / EFBIG
def test_disk_full_while_infer_writes_gctx_real_tmpfs(trained, tmp_path):
    """HDF5 fails mid-file on a full tmpfs: one line, exit 2, no crash (was: hang or SIGSEGV), nothing left."""
    with _tmpfs(tmp_path / "full", "size=1m") as full:
        res = _cli("infer", "--model", trained.bundle, "--input", trained.big, "--output", full / "p.gctx",
                   "--batch-size", "100", "--no-progress", timeout=180)  # fmt: skip
        _no_crash(res)
        assert_one_line_error(res, str(full / "p.gctx"), "no space left on device")
        assert list(full.iterdir()) == []


def test_disk_full_text_outputs_real_tmpfs(trained, tmp_path, capsys):
    """CSV predictions and the files of train, export and demo-data on a full disk: one line each, nothing left."""
    with _tmpfs(tmp_path / "full", "size=64k") as full:
        (full / "filler").write_bytes(b"\0" * (56 << 10))  # ~8 kB left
        res = _main(capsys, "infer", "--model", trained.bundle, "--input", trained.big, "--output", full / "p.csv",
                    "--no-progress")  # fmt: skip
        assert_one_line_error(res, str(full / "p.csv"), "no space left on device")
        res = _main(capsys, "export", "--dataset", trained.dataset, "--runs", *trained.runs, "--output",
                    full / "b", "--no-progress")  # fmt: skip
        assert_one_line_error(res, str(full / "b"), "no space left on device")
        assert [p.name for p in full.iterdir()] == ["filler"]
        # training: checkpoints, weights and tables of a run
        res = _main(capsys, "train", "--dataset", trained.dataset, "--output-dir", full / "run", "--layers", "1",
                    "--units", "4", "--dropout", "0", "--part", "0", "--epochs", "2", "--device", "cpu",
                    "--checkpoint-interval", "0", "--no-progress")  # fmt: skip
        assert_one_line_error(res, "no space left on device")
        assert _hidden(full) == []
        (full / "filler").unlink()
        for p in sorted(full.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        res = _cli("demo-data", "--output-dir", full / "demo", "--n-geo", "20", "--n-duplicates", "0",
                   "--n-1000g", "5", "--n-gtex", "5", "--max-targets", "50", timeout=180)  # fmt: skip
        _no_crash(res)
        assert_one_line_error(res, "no space left on device")
        assert _hidden(full) == []


def test_real_write_failure_inside_hdf5_never_crashes(trained, tmp_path):
    """RLIMIT_FSIZE: the kernel refuses HDF5's writes (EFBIG) mid-file, no root needed; GCTX and processed dataset."""
    out = tmp_path / "p.gctx"
    res = _cli("infer", "--model", trained.bundle, "--input", trained.big, "--output", out, "--batch-size", "100",
               "--no-progress", preexec_fn=_file_size_limit(300 << 10), timeout=180)  # fmt: skip
    _no_crash(res)
    assert_one_line_error(res, str(out), "file too large")
    assert not out.exists() and _hidden(tmp_path) == []

    maps = _maps(tmp_path)
    make_geo(tmp_path / "geo.gctx", maps["probes"], n_samples=3000)
    out = tmp_path / "ds" / "d.h5"
    res = _cli("preprocess", "--geo", tmp_path / "geo.gctx", "--landmarks", maps["landmarks"], "--targets",
               maps["targets"], "--dedup-clusters", "5", "--output", out, "--no-progress",
               preexec_fn=_file_size_limit(200 << 10), timeout=180)  # fmt: skip
    _no_crash(res)
    assert_one_line_error(res, str(out), "file too large", "temporary work file")
    assert list((tmp_path / "ds").iterdir()) == []


def test_injected_enospc_in_the_processed_dataset_write(tmp_path, capsys, monkeypatch):
    """A full disk while the dataset (not the work file) is written: one line naming it, work file removed too."""
    maps = _maps(tmp_path)
    make_geo(tmp_path / "geo.gctx", maps["probes"], n_samples=300)
    original = h5py.Dataset.__setitem__
    calls = []

    def setitem(self, key, value):
        calls.append(self.file.filename)
        if len(calls) == 10:  # pass 1 writes the work file in 6 blocks; the 10th write is the dataset's
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    out = tmp_path / "ds" / "d.h5"
    res = _main(capsys, "preprocess", "--geo", tmp_path / "geo.gctx", "--landmarks", maps["landmarks"],
                "--targets", maps["targets"], "--dedup-clusters", "5", "--chunk-size", "50", "--output", out,
                "--no-progress")  # fmt: skip
    assert len(calls) == 10
    assert_one_line_error(res, str(out), "no space left on device")
    assert list((tmp_path / "ds").iterdir()) == []


# --------------------------------------------------------------------------- unwritable locations, every verb
def _every_verb(trained, where: Path) -> dict[str, list]:
    """Each verb's command writing its output at (or below) ``where``."""
    r = [str(p) for p in trained.runs]
    return {
        "demo-data": ["demo-data", "--output-dir", where / "demo", "--n-geo", "5", "--n-duplicates", "0"],
        "acquire": ["acquire", "--url", trained.small.as_uri(), "--output", where / "x.gctx", "--no-progress"],
        "preprocess": ["preprocess", "--geo", trained.small, "--output", where / "d.h5", "--no-progress"],
        "train": ["train", "--dataset", trained.dataset, "--output-dir", where / "run", "--layers", "1", "--units",
                  "4", "--dropout", "0", "--part", "0", "--epochs", "1", "--device", "cpu", "--no-progress"],
        "baseline": ["baseline", "lr", "--dataset", trained.dataset, "--output-dir", where / "bl", "--no-progress"],
        "aggregate": ["aggregate", "--dgex-runs", *r, "--output-dir", where / "agg"],
        "tables": ["tables", "--aggregate", trained.agg, "--output-dir", where / "tables", "--bootstrap", "5"],
        "figures": ["figures", "--aggregate", trained.agg, "--output-dir", where / "figures"],
        "interpret": ["interpret", "s3", "--runs", *r, "--output-dir", where / "s3", "--no-progress"],
        "export": ["export", "--dataset", trained.dataset, "--runs", *r, "--output", where / "bundle", "--no-progress"],
        "infer": ["infer", "--model", trained.bundle, "--input", trained.small, "--output", where / "p.gctx",
                  "--no-progress"],
    }  # fmt: skip


def test_read_only_file_system_every_verb(trained, tmp_path, capsys):
    with _tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for verb, args in _every_verb(trained, ro).items():
            res = _main(capsys, *args)
            assert res.returncode == 2, (verb, res.stderr)
            assert_one_line_error(res, str(ro), "read-only file system")


def test_file_where_a_folder_must_be_every_verb(trained, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    for verb, args in _every_verb(trained, blocker / "sub").items():
        res = _main(capsys, *args)
        assert res.returncode == 2, (verb, res.stderr)
        assert_one_line_error(res, f"{blocker}: is a file, not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_folder_where_a_file_must_be(trained, tmp_path, capsys):
    for name, args in {
        "p.gctx": ["infer", "--model", trained.bundle, "--input", trained.small, "--overwrite", "--no-progress"],
        "p.csv": ["infer", "--model", trained.bundle, "--input", trained.small, "--overwrite", "--no-progress"],
        "d.h5": ["preprocess", "--geo", trained.small, "--no-progress"],
    }.items():
        (tmp_path / name).mkdir()
        res = _main(capsys, *args, "--output", tmp_path / name)
        assert_one_line_error(res, f"{tmp_path / name}: is a directory")
    assert _hidden(tmp_path) == []


def test_permission_denied_on_rename(trained, tmp_path, capsys, monkeypatch):
    """Injected EACCES when the finished file is renamed into place (root ignores permission bits)."""

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(dio.os, "replace", refuse)
    for out in (tmp_path / "p.csv", tmp_path / "p.gctx"):
        res = _main(capsys, "infer", "--model", trained.bundle, "--input", trained.small, "--output", out,
                    "--no-progress")  # fmt: skip
        assert_one_line_error(res, str(out), "permission denied")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_bundle(trained, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bundle"
    shutil.copytree(trained.bundle, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    replace = os.replace

    def refuse_new_bundle(src, dst):  # moving the old bundle aside works, moving the new one in fails
        if Path(src).name.startswith(".bundle~") and Path(src).name.endswith(".tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return replace(src, dst)

    monkeypatch.setattr(dio.os, "replace", refuse_new_bundle)
    res = _main(capsys, "export", "--dataset", trained.dataset, "--runs", *trained.runs, "--output", out,
                "--overwrite", "--no-progress")  # fmt: skip
    assert_one_line_error(res, str(out), "input/output error")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _hidden(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits; the injected variant runs instead")
def test_permission_denied_real(trained, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        res = _main(capsys, "infer", "--model", trained.bundle, "--input", trained.small, "--output",
                    locked / "p.csv", "--no-progress")  # fmt: skip
        assert_one_line_error(res, "permission denied")
    finally:
        locked.chmod(0o755)


# --------------------------------------------------------------------------- interrupted runs
KILL_SCRIPT = r"""
import os, signal, sys
where, n = os.environ["DGEX_TEST_KILL"].split(":")
n, seen = int(n), [0]


def hit():
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)


if where == "h5write":  # the n-th block written into any HDF5 dataset
    import h5py

    setitem = h5py.Dataset.__setitem__

    def counted(self, key, value):
        hit()
        return setitem(self, key, value)

    h5py.Dataset.__setitem__ = counted
else:  # just before / after the n-th rename of a finished temporary file or folder
    replace = os.replace

    def counted(src, dst):
        if where == "before-rename":
            hit()
        replace(src, dst)
        if where == "after-rename":
            hit()

    os.replace = counted
from dgex.cli import main

sys.exit(main(sys.argv[1:]))
"""


def _killed(args, point: str):
    res = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "DGEX_TEST_KILL": point},
        timeout=300,
    )
    assert res.returncode == -signal.SIGKILL, f"{point} never reached: {res.stderr[-2000:]}"


def _kill_and_rerun(args, points, folder: Path, outputs: list[Path], compare, capsys):
    """For each kill point: SIGKILL there, rerun the same command, compare with the first result, no leftovers."""
    assert _main(capsys, *args).returncode == 0
    reference = compare()
    for point in points:
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        _killed(args, point)
        if not point.startswith("after"):
            assert _hidden(folder), f"{point}: the killed run left nothing behind, so this kill point tests nothing"
        res = _main(capsys, *args)
        assert res.returncode == 0, (point, res.stderr)
        assert compare() == reference, point
        assert _hidden(folder) == [], point
    return reference


def test_kill9_infer_then_the_same_command(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the provenance's creation time: same in every run
    out = tmp_path / "out" / "p.gctx"
    args = ["infer", "--model", trained.bundle, "--input", trained.big, "--output", out, "--batch-size", "1",
            "--overwrite", "--no-progress"]  # fmt: skip
    points = ["h5write:500", "before-rename:1", "after-rename:1"]
    reference = _kill_and_rerun(args, points, out.parent, [out], out.read_bytes, capsys)
    # and at a moment no hook chose: as soon as the temporary file shows (one sample per write: 2000 writes)
    out.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "dgex", *map(str, args)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _hidden(out.parent) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert _hidden(out.parent), "infer finished before its temporary file was seen"
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert _main(capsys, *args).returncode == 0
    assert _hidden(out.parent) == [] and out.read_bytes() == reference


def _maps(tmp_path):
    """12 landmark genes and 30 targets (as conftest.tiny_maps, usable outside a fixture)."""
    lm = [(f"LM{i}", f"ENSG9000000{i:04d}", f"lm{i}_at") for i in range(12)]
    tg = [
        (f"TG{i}" if i >= 4 else lm[i][0], lm[i][1] if i < 4 else f"ENSG9100000{i:04d}",
         ",".join(f"tg{i}_{k}_at" for k in range(1 + i % 3)))
        for i in range(30)
    ]  # fmt: skip
    (tmp_path / "map_lm.txt").write_text("".join("\t".join(r) + "\n" for r in lm))
    (tmp_path / "map_tg.txt").write_text("".join("\t".join(r) + "\n" for r in tg))
    probes = [r[2] for r in lm] + [p for r in tg for p in r[2].split(",")]
    return {"landmarks": tmp_path / "map_lm.txt", "targets": tmp_path / "map_tg.txt", "probes": probes}


def test_kill9_preprocess_then_the_same_command(tmp_path, capsys):
    maps = _maps(tmp_path)
    make_geo(tmp_path / "geo.gctx", maps["probes"], n_samples=300)
    out = tmp_path / "ds" / "d.h5"
    summary = out.with_suffix(".json")
    args = ["preprocess", "--geo", tmp_path / "geo.gctx", "--landmarks", maps["landmarks"], "--targets",
            maps["targets"], "--dedup-clusters", "5", "--chunk-size", "50", "--output", out, "--no-progress"]  # fmt: skip

    def result():
        info = json.loads(summary.read_text())
        for volatile in ("seconds", "timings"):
            info.pop(volatile)
        return out.read_bytes(), info

    # work file written in blocks 1-6, the dataset from block 7 on; renames: dataset, then summary
    points = ["h5write:2", "h5write:12", "before-rename:2"]
    _kill_and_rerun(args, points, out.parent, [out, summary], result, capsys)


def test_kill9_export_then_the_same_command(trained, tmp_path, capsys):
    out = tmp_path / "exp" / "bundle"
    args = ["export", "--dataset", trained.dataset, "--runs", *trained.runs, "--output", out, "--overwrite",
            "--no-progress"]  # fmt: skip

    def result():
        info = json.loads((out / "bundle.json").read_text())
        info.pop("created")
        files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "bundle.json"}
        return info, files

    # renames: bundle.json inside the temporary folder, then the folder into place
    points = ["before-rename:1", "after-rename:2"]
    _kill_and_rerun(args, points, out.parent, [out], result, capsys)


def test_sigterm_cleans_up_and_says_so(trained, tmp_path):
    out = tmp_path / "p.gctx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgex", "infer", "--model", str(trained.bundle), "--input", str(trained.big),
         "--output", str(out), "--batch-size", "1", "--no-progress"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not _hidden(tmp_path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        assert _hidden(tmp_path), "infer finished before its temporary file was seen"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("dgex: terminated (SIGTERM)") and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_training_is_not_a_success(trained, tmp_path):
    """Lightning turns SIGTERM into a SystemExit with status 0: dgex reports it as the termination it is."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgex", "train", "--dataset", str(trained.dataset), "--output-dir", str(run),
         "--layers", "1", "--units", "4", "--dropout", "0", "--part", "0", "--epochs", "100000", "--device", "cpu",
         "--checkpoint-interval", "0", "--no-progress"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (run / "history.csv").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert (run / "history.csv").exists(), "training never wrote its first epoch"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("dgex: terminated (SIGTERM)") and "Traceback" not in err
    assert _hidden(run) == [] and not (run / "run.json").exists()


TERM_INSIDE_HDF5 = r"""
import os, signal, sys
import dgex.io as dio

n, seen, write_all = int(os.environ["DGEX_TEST_TERM_AT"]), [0], dio._HDF5Sink._write_all


def counted(self, view):  # SIGTERM arrives while HDF5 is inside dgex's write callback
    seen[0] += 1
    if seen[0] == n:
        os.kill(os.getpid(), signal.SIGTERM)
    return write_all(self, view)


dio._HDF5Sink._write_all = counted
from dgex.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_inside_an_hdf5_write_is_delivered_after_it(tmp_path):
    """Raising inside HDF5's file callback would fail the write inside HDF5: the signal waits until it returns."""
    maps = _maps(tmp_path)
    make_geo(tmp_path / "geo.gctx", maps["probes"], n_samples=300)
    out = tmp_path / "ds" / "d.h5"
    args = ["preprocess", "--geo", tmp_path / "geo.gctx", "--landmarks", maps["landmarks"], "--targets",
            maps["targets"], "--dedup-clusters", "5", "--chunk-size", "10", "--output", out, "--no-progress"]  # fmt: skip
    for at in ("3", "40"):  # the work file's flush; the dataset's last writes (at its close)
        shutil.rmtree(out.parent, ignore_errors=True)
        res = subprocess.run(
            [sys.executable, "-c", TERM_INSIDE_HDF5, *map(str, args)],
            capture_output=True,
            text=True,
            env={**os.environ, "DGEX_TEST_TERM_AT": at},
            timeout=300,
        )
        assert res.returncode == 128 + signal.SIGTERM, res.stderr[-3000:]
        assert res.stderr.strip().splitlines()[-1].startswith("dgex: terminated (SIGTERM)"), res.stderr[-3000:]
        assert "Traceback" not in res.stderr and "Fatal Python error" not in res.stderr
        # where the signal takes effect depends on timing (it waits until h5py returns): what exists is whole
        assert _hidden(out.parent) == []
        assert not out.exists() or _arrays(out)["splits/geo-tr/X"].shape == (240, 12)
        assert not out.with_suffix(".json").exists() or json.loads(out.with_suffix(".json").read_text())


def test_reader_thread_never_blocks_a_failed_consumer():
    """infer's read-ahead thread: an error after the input was read must not hang (it deadlocked on a full queue)."""
    from dgex.infer import _prefetch

    gen = _prefetch(iter([1, 2]))
    assert next(gen) == 1
    time.sleep(0.3)  # the thread has queued 2 and now offers the end marker
    closer = threading.Thread(target=gen.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()


# --------------------------------------------------------------------------- duplicate sample names (item 6)
def test_repeated_sample_names_in_text_inputs_are_rejected(tmp_path):
    header_dup = ["id", "A", "B", "A"]
    rows = [["g1", "1", "2", "3"], ["g2", "4", "5", "6"]]
    for name, sep in (("x.tsv", "\t"), ("x.csv", ","), ("x.txt", "\t")):
        (tmp_path / name).write_text("\n".join(sep.join(r) for r in [header_dup, *rows]) + "\n")
        with pytest.raises(InputError, match=r"1 duplicate column id.*e\.g\. A"):
            open_matrix(tmp_path / name)
    write_tsv(tmp_path / "x.tsv.gz", np.ones((3, 2)), ["g1", "g2"], ["A", "B", "A"])
    with pytest.raises(InputError, match="duplicate column"):
        open_matrix(tmp_path / "x.tsv.gz")
    gct = "#1.2\n2\t3\nName\tDescription\tA\tB\tA\n" + "".join(f"g{i}\td\t1\t2\t3\n" for i in range(2))
    (tmp_path / "x.gct").write_text(gct)
    with pytest.raises(InputError, match="duplicate column"):
        open_matrix(tmp_path / "x.gct")
    # a sample really named like pandas' renaming is no duplicate
    (tmp_path / "ok.csv").write_text("id,A,A.1\ng1,1,2\ng2,3,4\n")
    m = open_matrix(tmp_path / "ok.csv")
    assert list(m.col_ids) == ["A", "A.1"] and m.read().tolist() == [[1, 3], [2, 4]]
    (tmp_path / "ok.gct").write_text("#1.2\n1\t2\nName\tDescription\tA\tA.1\ng1\td\t1\t2\n")
    assert list(open_matrix(tmp_path / "ok.gct").col_ids) == ["A", "A.1"]


def test_repeated_sample_names_cli(trained, tmp_path, capsys):
    df = pd.DataFrame(np.full((N_LANDMARKS, 3), 8.0), columns=["S1", "S2", "S1"])
    df.insert(0, "id", trained.landmarks)
    df.to_csv(tmp_path / "in.csv", index=False)
    res = _main(capsys, "infer", "--model", trained.bundle, "--input", tmp_path / "in.csv", "--output",
                tmp_path / "p.csv", "--no-progress")  # fmt: skip
    assert_one_line_error(res, "in.csv", "duplicate column id", "S1")

    maps = _maps(tmp_path)
    make_geo(tmp_path / "geo.gctx", maps["probes"], n_samples=60)
    ens = sorted(
        {line.split("\t")[1] for line in (maps["landmarks"].read_text() + maps["targets"].read_text()).splitlines()}
    )
    write_tsv(tmp_path / "g1000.tsv", np.full((4, len(ens)), 3.0), ens, ["NA1", "NA2", "NA1", "NA3"])
    res = _main(capsys, "preprocess", "--geo", tmp_path / "geo.gctx", "--g1000", tmp_path / "g1000.tsv",
                "--landmarks", maps["landmarks"], "--targets", maps["targets"], "--dedup-clusters", "5",
                "--output", tmp_path / "d.h5", "--no-progress")  # fmt: skip
    assert_one_line_error(res, "g1000.tsv", "duplicate column id", "NA1")


# --------------------------------------------------------------------------- output names vs formats (item 8)
@pytest.mark.parametrize(
    "name, fmt, fragment",
    [
        ("p.csv", "gctx", "the extension .csv promises csv but --format gctx"),
        ("p.gctx.gz", None, "GCTX is HDF5, written uncompressed: name it p.gctx"),
        ("p.parquet", None, "parquet output is not offered"),
        ("p.txt", "csv", "the extension .txt promises tsv but --format csv"),
        ("p.json", "tsv", "the extension .json promises a format"),
        ("p.gct", None, "the extension .gct promises a format"),
    ],
)
def test_infer_output_name_must_not_promise_another_format(trained, tmp_path, name, fmt, fragment):
    from dgex.infer import infer

    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        infer(model=trained.bundle, input=trained.small, output=tmp_path / name, output_format=fmt, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_output_names_that_agree_are_written_as_promised(trained, tmp_path):
    from dgex.infer import infer

    infer(model=trained.bundle, input=trained.small, output=tmp_path / "p.tsv.gz", progress=False)
    infer(model=trained.bundle, input=trained.small, output=tmp_path / "p.txt", progress=False)
    infer(model=trained.bundle, input=trained.small, output=tmp_path / "preds", output_format="csv", progress=False)
    a = pd.read_csv(tmp_path / "p.tsv.gz", sep="\t")  # really gzip, really tabs
    b = pd.read_csv(tmp_path / "p.txt", sep="\t")
    c = pd.read_csv(tmp_path / "preds", sep=",")
    n_meta = a.shape[1] - 400  # id + the bundle's row metadata (CMap fields, flags, reliability), then 400 samples
    assert a.shape == b.shape == c.shape == (N_TARGETS, n_meta + 400) and n_meta >= 9
    assert list(a.columns) == list(b.columns) == list(c.columns) and a.columns[0] == "id"


def test_preprocess_and_export_output_names(trained, tmp_path, capsys):
    res = _main(capsys, "preprocess", "--geo", trained.small, "--output", tmp_path / "foo.csv", "--no-progress")
    assert_one_line_error(res, "foo.csv", "HDF5", "name it foo.h5")
    res = _main(capsys, "preprocess", "--geo", trained.small, "--output", tmp_path / "d.h5", "--summary",
                tmp_path / "s.csv", "--no-progress")  # fmt: skip
    assert_one_line_error(res, "s.csv", "JSON")
    res = _main(capsys, "export", "--dataset", trained.dataset, "--runs", *trained.runs, "--output",
                tmp_path / "model.zip", "--no-progress")  # fmt: skip
    assert_one_line_error(res, "model.zip", "a model bundle is a folder")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- flat samples, constant genes (item 8)
def _arrays(path) -> dict:
    with h5py.File(path, "r") as h5:
        out = {}
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_preprocess_removes_flat_samples_as_if_absent(tmp_path, caplog):
    """Flat (failed-array) profiles are dropped: the dataset equals the one built without them."""
    from dgex.preprocess import preprocess

    maps = _maps(tmp_path)
    data, probes, samples, _ = make_geo(tmp_path / "clean.gctx", maps["probes"], n_samples=200, n_dups=10)
    flat_at = [3, 50, 120]
    flat = np.stack([np.full(len(probes), 7.0), np.full(len(probes), 2.0), 9.0 + 0.01 * np.sin(np.arange(len(probes)))])
    with_flat = np.insert(data, flat_at, flat, axis=0)
    names = np.insert(np.array(samples, dtype=object), flat_at, [f"FLAT{i}" for i in range(3)]).tolist()
    write_gctx(tmp_path / "flat.gctx", with_flat, probes, names)
    common = dict(
        landmarks=maps["landmarks"], targets=maps["targets"], dedup_clusters=5, chunk_size=10_000, progress=False
    )
    clean = preprocess(geo=tmp_path / "clean.gctx", output=tmp_path / "a" / "d.h5", **common)
    with caplog.at_level(logging.WARNING):
        dirty = preprocess(geo=tmp_path / "flat.gctx", output=tmp_path / "b" / "d.h5", **common)
    warned = [r.getMessage() for r in caplog.records if "flat" in r.getMessage()]
    assert len(warned) == 1 and "3 of 213 GEO samples are flat" in warned[0] and "FLAT0" in warned[0]
    assert dirty["flat_removed"] == 3 and clean["flat_removed"] == 0
    assert dirty["duplicates_removed"] == clean["duplicates_removed"] == 10
    a, b = _arrays(tmp_path / "a" / "d.h5"), _arrays(tmp_path / "b" / "d.h5")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_preprocess_warns_about_constant_genes(tmp_path, caplog):
    from dgex.preprocess import preprocess

    maps = _maps(tmp_path)
    data, probes, samples, _ = make_geo(tmp_path / "g.gctx", maps["probes"], n_samples=120)
    data[:, probes.index("lm3_at")] = 6.5  # landmark LM3 measured as one value everywhere
    write_gctx(tmp_path / "g.gctx", data, probes, samples)
    with caplog.at_level(logging.WARNING):
        preprocess(geo=tmp_path / "g.gctx", output=tmp_path / "d.h5", landmarks=maps["landmarks"],
                   targets=maps["targets"], dedup_clusters=5, progress=False)  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "1 of 12 landmark genes are constant" in warned[0] and "LM3" in warned[0], warned


def test_infer_warns_about_flat_samples_and_constant_landmarks(trained, tmp_path, caplog):
    from dgex.infer import infer

    x = np.random.default_rng(3).normal(8.0, 1.0, size=(30, N_LANDMARKS)).astype(np.float32)
    x[[7, 21]] = 5.0  # failed arrays
    x[:, 4] = 5.0  # an unmeasured landmark
    write_gctx(tmp_path / "in.gctx", x, trained.landmarks, [f"S{i}" for i in range(30)])
    with caplog.at_level(logging.WARNING):
        infer(
            model=trained.bundle, input=tmp_path / "in.gctx", output=tmp_path / "p.gctx", chunk_size=8, progress=False
        )
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("2 of 30 samples have a flat landmark profile" in w and "S7, S21" in w for w in warned), warned
    assert any("1 of 20 landmark genes have the same value in all 30 samples" in w for w in warned), warned
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a normal input: no warning
        infer(model=trained.bundle, input=trained.small, output=tmp_path / "q.gctx", progress=False)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_storage_error_is_a_dgex_error():
    from dgex.errors import DgexError

    err = dio.storage_error(OSError(errno.ENOSPC, "No space left on device"), "/x/y.gctx")
    assert isinstance(err, DgexError) and str(err).startswith("/x/y.gctx: no space left on device; ")
