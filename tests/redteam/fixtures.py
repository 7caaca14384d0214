"""Shared fixtures and oracles of the red-team sweep (``tests/redteam/sweep.py``).

The fixtures are built once per sweep, in ``<base>/fixtures``, with the real
``dgex`` commands on tiny inputs (seconds each); cases copy what they damage.
The oracles recompute results independently (numpy / torch state dicts read
directly), never through the dgex function under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "tests"))  # helpers_dataset

PY = sys.executable

#: Tiny demo: 60 GEO profiles (+4 duplicates), 12 1000G, 12 GTEx samples, 943 landmarks, 20 targets.
DEMO_ARGS = [
    "--n-geo", "60", "--n-duplicates", "4", "--n-1000g", "12", "--n-gtex", "12",
    "--n-latent", "3", "--max-targets", "20",
]  # fmt: skip
#: preprocess flags matching DEMO_ARGS (the GEO input holds exactly these targets' probes).
PRE_ARGS = ["--max-targets", "20", "--dedup-clusters", "4", "--chunk-size", "32", "--no-progress"]
#: a tiny, fast training (2 epochs of a 1x8 network).
TRAIN_ARGS = ["--epochs", "2", "--monitor-size", "20", "--device", "cpu", "--threads", "1", "--no-progress"]


def child_env(extra: dict | None = None) -> dict:
    """Environment of every command the sweep runs: one thread each, no GPU leases in /tmp."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("DGEX_GPUS", None)
    env.update(extra or {})
    return env


class Skip(Exception):
    """The case cannot run here (e.g. mounting needs root); the message says why."""


@dataclass
class Case:
    verb: str
    name: str
    cls: str  # the fault class (for the summary)
    expect: str
    body: Callable  # body(ctx) -> Result
    msg: tuple = ()  # fragments the error line (or, for wf-fail, the message) must contain, case-insensitive
    warn: str | None = None  # regex a WARNING line must match (warn-ok, reject)
    check: Callable | None = None  # oracle: check(ctx, res) -> None or what is wrong
    outputs: tuple = ()  # paths (relative to the case folder) that must hold no file when the command failed
    slow: bool = False  # workflow runs, kills, big inputs: not in --fast
    xfail: str = ""  # known failure on today's code (what the issue says is wrong)
    timeout: float = 300.0
    smoke: bool = False  # in the quick subset that tests/test_redteam.py runs

    @property
    def id(self) -> str:
        return f"{self.verb}/{self.name}"


@dataclass
class Result:
    """One finished command: argv, exit status (negative = killed by that signal), output, seconds."""

    argv: list
    rc: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


def _start(argv: list[str], cwd, env) -> subprocess.Popen:
    """``argv`` started in a session of its own (so that its whole group can be signalled), text pipes."""
    return subprocess.Popen(
        argv,
        cwd=str(cwd),
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def run(argv, cwd, env=None, timeout=300, prefix=None) -> Result:
    """Run ``argv`` (strings) in ``cwd``; a timeout kills the process group and returns rc -9."""
    argv = [str(a) for a in argv]
    t0 = time.time()
    proc = _start(list(prefix or []) + argv, cwd, env)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return Result(argv, proc.returncode, out, err, time.time() - t0, timed_out)


def dgex(*args, cwd, env=None, timeout=300, prefix=None) -> Result:
    return run([PY, "-m", "dgex", *args], cwd, env, timeout, prefix)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def run_killed(
    argv, cwd, trigger, sig=signal.SIGKILL, env=None, timeout=120, settle=0.0, tree=False, poll=0.01
) -> Result:
    """Start ``argv``, send ``sig`` to its process group once ``trigger()`` is true (polled), wait for it.

    ``tree``: also signal every descendant (jobs that run in sessions of their own), as a
    crash of the machine or ``kill -9`` of everything would.  Returns the killed command's
    Result (``rc`` is ``-sig`` when the signal ended it); ``stderr`` gets a note when the
    trigger never fired before the command ended by itself.
    """
    argv = [str(a) for a in argv]
    t0 = time.time()
    proc = _start(argv, cwd, env)
    # drain the pipes in threads so that a chatty child never blocks on a full pipe
    chunks = {"out": [], "err": []}

    def drain(stream, key):
        for line in stream:
            chunks[key].append(line)

    threads = [
        threading.Thread(target=drain, args=(proc.stdout, "out"), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, "err"), daemon=True),
    ]
    for t in threads:
        t.start()
    fired = False
    while proc.poll() is None and time.time() - t0 < timeout:
        if trigger():
            if settle:
                time.sleep(settle)
            victims = descendants(proc.pid) if tree else []
            with _suppress():
                os.killpg(proc.pid, sig)
            for pid in victims:
                with _suppress():
                    os.kill(pid, sig)
            fired = True
            break
        time.sleep(poll)
    if not fired and proc.poll() is None:
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for t in threads:
        t.join(timeout=5)
    err = "".join(chunks["err"])
    if not fired:
        err += "\n[sweep] the kill trigger never fired: the command ended (or timed out) by itself\n"
    return Result(argv, proc.returncode, "".join(chunks["out"]), err, time.time() - t0, not fired)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


#: Runs ``dgex`` (argv after ``-c SCRIPT``) and pauses it at a chosen point so that a kill lands there for sure:
#: ``DGEX_SWEEP_PAUSE=<where>:<n>:<marker>`` -- at the n-th HDF5 dataset write (``h5write``) or just before the
#: n-th rename of a finished temporary file or folder (``before-rename``) or at the n-th call of a function
#: (``call=module.name``), create ``marker`` and sleep.  ``call=`` pauses in the calling thread: a SIGTERM must
#: find the main thread there (dgex defers it while the main thread waits on its writer thread or in HDF5).
#: A test hook of the sweep only (monkey-patched from outside); nothing of it ships with dgex.
PAUSE_SCRIPT = r"""
import os, sys, time
where, n, marker = os.environ["DGEX_SWEEP_PAUSE"].split(":", 2)
n, seen = int(n), [0]


def hit():
    seen[0] += 1
    if seen[0] == n:
        open(marker, "w").close()
        time.sleep(120)  # the sweep kills the process here


if where == "h5write":
    import h5py

    setitem = h5py.Dataset.__setitem__

    def counted(self, key, value):
        hit()
        return setitem(self, key, value)

    h5py.Dataset.__setitem__ = counted
elif where == "before-rename":
    replace = os.replace

    def counted(src, dst):
        hit()
        return replace(src, dst)

    os.replace = counted
elif where.startswith("call="):
    import importlib

    # module.function or module.Class.method: import the longest importable prefix, then walk attributes
    parts = where[len("call=") :].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for attr in parts[cut:-1]:
        module = getattr(module, attr)
    name = parts[-1]
    original = getattr(module, name)

    def counted(*args, **kwargs):
        hit()
        return original(*args, **kwargs)

    setattr(module, name, counted)
else:
    raise SystemExit(f"unknown pause point {where}")
from dgex.cli import main

sys.exit(main(sys.argv[1:]))
"""


def run_paused(args, cwd, point: str, sig=signal.SIGKILL, timeout=120, while_paused=None) -> Result:
    """Run ``dgex *args`` paused at ``point`` (see :data:`PAUSE_SCRIPT`), send it ``sig`` there, wait for it.

    ``while_paused()``, if given, is called once the pause is reached, before the signal (e.g. to run a
    second command while the first is alive at a known point).  Raises RuntimeError when the point was
    never reached (the command ended by itself): the case would test nothing.
    """
    marker = Path(cwd) / ".sweep-paused"
    marker.unlink(missing_ok=True)

    def trigger():
        if not marker.exists():
            return False
        if while_paused is not None:
            while_paused()
        return True

    argv = [PY, "-c", PAUSE_SCRIPT, *map(str, args)]
    try:
        res = run_killed(argv, cwd, trigger, sig=sig, env={"DGEX_SWEEP_PAUSE": f"{point}:{marker}"}, timeout=timeout)
    finally:
        marker.unlink(missing_ok=True)
    if res.timed_out:
        raise RuntimeError(f"pause point {point} never reached (exit {res.rc}): {res.stderr[-800:]}")
    return res


def glob_exists(folder: Path, pattern: str):
    """A trigger: true once a file matching ``pattern`` exists anywhere under ``folder``."""
    return lambda: any(True for _ in Path(folder).rglob(pattern))


# --------------------------------------------------------------------------- #
# the fixtures
# --------------------------------------------------------------------------- #
class FixtureError(RuntimeError):
    """A fixture could not be built: the sweep stops (it tests nothing without them)."""


class Fixtures:
    """Fixture files under ``root``, each built on first use (thread-safe), dependencies first.

    ``p("ds.h5")`` builds the processed dataset (and the demo inputs it needs)
    the first time it is asked for; :meth:`build` builds every core fixture,
    two commands at a time.  What each fixture is: see :data:`FIXTURES`.
    """

    def __init__(self, root: Path, reuse: bool = False):
        self.root = Path(root)
        self.reuse = reuse  # keep fixture files an earlier sweep left in root
        self._locks: dict[tuple, threading.RLock] = {}
        self._guard = threading.Lock()
        self._done: set[tuple] = set()
        self.root.mkdir(parents=True, exist_ok=True)

    def p(self, *parts) -> Path:
        """The path of a fixture file, built first if needed."""
        parts = tuple(str(x) for x in parts)
        for key in sorted(FIXTURES, key=len, reverse=True):
            if parts[: len(key)] == key:
                self.ensure(key)
                break
        return self.root.joinpath(*parts)

    def ensure(self, key: tuple) -> None:
        with self._guard:
            if key in self._done:
                return
            lock = self._locks.setdefault(key, threading.RLock())
        with lock:
            if key in self._done:
                return
            if self.reuse and self.root.joinpath(*key).exists():
                self._done.add(key)
                return
            path = self.root.joinpath(*key)
            if path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            path.parent.mkdir(parents=True, exist_ok=True)
            getattr(self, FIXTURES[key])(path)
            with self._guard:
                self._done.add(key)

    def _dgex(self, what, *args, timeout=900):
        res = dgex(*args, cwd=self.root, timeout=timeout)
        if res.rc != 0:
            raise FixtureError(f"fixture {what} failed (exit {res.rc}):\n{res.stderr[-3000:]}")
        return res

    def build(self, log=print, width: int = 2) -> None:
        """Every core fixture (about a minute on 2 idle cores), ``width`` at a time."""
        t0 = time.time()
        keys = [k for k in FIXTURES if k not in LAZY_ONLY]
        errors: list[BaseException] = []

        def one(key):
            try:
                self.ensure(key)
            except BaseException as exc:  # reported below
                errors.append(exc)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=width) as pool:
            list(pool.map(one, keys))
        if errors:
            raise errors[0] if isinstance(errors[0], FixtureError) else FixtureError(repr(errors[0]))
        log(f"fixtures built in {time.time() - t0:.1f} s under {self.root}")

    # -- builders: each writes exactly its own path
    def _demo(self, path):
        self._dgex("demo-data", "demo-data", "--output-dir", path, *DEMO_ARGS)

    def _preprocess(self, path, *extra, rna=True):
        demo = self.p("demo")
        args = ["preprocess", "--geo", demo / "geo.gctx", *PRE_ARGS, "--output", path, *extra]
        if rna:
            args += ["--g1000", demo / "1000g.tsv.gz", "--gtex", demo / "gtex.gctx"]
        self._dgex(f"preprocess {path.name}", *args)
        path.with_suffix(".json").unlink(missing_ok=True)  # the summary: not a fixture

    def _ds(self, path):
        self._preprocess(path)

    def _ds_split1(self, path):
        self._preprocess(path, "--split-seed", "1")

    def _ds_geo(self, path):
        self._preprocess(path, rna=False)

    def _ds_parts1(self, path):
        self._preprocess(path, "--target-parts", "1")

    def _toy(self, path):
        from helpers_dataset import write_toy_dataset

        write_toy_dataset(path, n_tr=400, n_landmarks=20, n_targets=30, n_parts=2, nonlinear=0.5)

    def _train_parts(self, path, dataset, layers, units, parts=(0, 1)):
        ds = self.p(dataset)
        for part in parts:
            self._dgex(f"train {path}/part{part}", *train_argv(ds, path / f"part{part}", layers, units, part))

    def _runs_1x8(self, path):
        self._train_parts(path, "ds.h5", 1, 8)

    def _runs_1x4(self, path):
        self._train_parts(path, "ds.h5", 1, 4)

    def _runs_geo(self, path):
        self._train_parts(path / "1x8_d0", "ds_geo.h5", 1, 8, parts=(0,))

    def _toy_1x8(self, path):
        self._train_parts(path, "toy.h5", 1, 8)

    def _toy_2x8(self, path):
        self._train_parts(path, "toy.h5", 2, 8, parts=(0,))

    def _base(self, path):
        self._dgex("baseline lr", "baseline", "lr", "--dataset", self.p("ds.h5"), "--output-dir", path / "lr", "--no-progress")  # fmt: skip

    def _agg(self, path):
        runs = [self.p("runs", a, f"part{k}") for a in ("1x8_d0", "1x4_d0") for k in (0, 1)]
        self._dgex("aggregate", "aggregate", "--dgex-runs", *runs, "--baseline-runs", self.p("base", "lr"), "--output-dir", path)  # fmt: skip

    def _bundle(self, path):
        runs = [self.p("runs", "1x8_d0", f"part{k}") for k in (0, 1)]
        self._dgex("export", "export", "--dataset", self.p("ds.h5"), "--runs", *runs, "--output", path, "--no-progress")  # fmt: skip

    def _infer_x(self, path):
        """Landmark profiles for `dgex infer`: ``infer_X.npy`` (30, L) in bundle order."""
        stats = np.load(self.p("bundle", "stats.npz"))
        rng = np.random.default_rng(7)
        X = stats["landmark_mean"] + stats["landmark_std"] * rng.normal(size=(30, len(stats["landmark_mean"])))
        np.save(path, np.clip(X, 1.0, 15.5).astype(np.float32))

    def _in_ens(self, path):
        X = np.load(self.p("infer_X.npy"))
        write_table(path, X, bundle_landmarks(self.p("bundle"))["ensembl"], [f"smp{i:03d}" for i in range(len(X))])

    def _infer_big(self, path):
        """10,000 profiles of the bundle's landmarks as GCTX (for kills during `dgex infer`)."""
        from dgex.io import write_gctx

        lm = bundle_landmarks(self.p("bundle"))
        stats = np.load(self.p("bundle", "stats.npz"))
        rng = np.random.default_rng(11)
        X = stats["landmark_mean"] + stats["landmark_std"] * rng.normal(size=(10000, len(lm)))
        X = np.clip(X, 1.0, 15.5).astype(np.float32)
        write_gctx(path / "big.gctx", X, lm["ensembl"].tolist(), [f"b{i:05d}" for i in range(len(X))])
        np.save(path / "X.npy", X)

    def _big_demo(self, path):
        """A larger demo (4,000 GEO profiles) so that preprocess runs long enough to be killed mid-way."""
        args = ["--n-geo", "4000", "--n-duplicates", "10", "--n-1000g", "12", "--n-gtex", "12"]
        self._dgex("big demo", "demo-data", "--output-dir", path, *args, "--n-latent", "3", "--max-targets", "20")

    def _ref_train(self, path):
        """An uninterrupted 6-epoch run (the reference of the kill-and-resume cases)."""
        self._dgex("reference train", *train_argv(self.p("ds.h5"), path, epochs=6))

    def _wf_base(self, path):
        from cases import build_wf_base  # the workflow config lives with the workflow cases

        build_wf_base(path)

    # convenience names used by the cases
    def big_demo(self) -> Path:
        return self.p("big_demo")

    def infer_big(self) -> Path:
        return self.p("infer_big", "big.gctx")

    def reference_train(self) -> Path:
        return self.p("ref_train")


#: fixture path (as a tuple of parts) -> builder method of :class:`Fixtures`
FIXTURES = {
    ("demo",): "_demo",
    ("ds.h5",): "_ds",
    ("ds_split1.h5",): "_ds_split1",
    ("ds_geo.h5",): "_ds_geo",
    ("ds_parts1.h5",): "_ds_parts1",
    ("toy.h5",): "_toy",
    ("runs", "1x8_d0"): "_runs_1x8",
    ("runs", "1x4_d0"): "_runs_1x4",
    ("runs_geo",): "_runs_geo",
    ("toy_runs", "1x8_d0"): "_toy_1x8",
    ("toy_runs", "2x8_d0"): "_toy_2x8",
    ("base",): "_base",
    ("agg",): "_agg",
    ("bundle",): "_bundle",
    ("infer_X.npy",): "_infer_x",
    ("in_ens.tsv",): "_in_ens",
    ("infer_big",): "_infer_big",
    ("big_demo",): "_big_demo",
    ("ref_train",): "_ref_train",
    ("wf_base",): "_wf_base",
}
#: built only when a case asks for them (slow cases), never by :meth:`Fixtures.build`
LAZY_ONLY = {("infer_big",), ("big_demo",), ("ref_train",), ("wf_base",)}


def train_argv(dataset, out, layers=1, units=8, part=0, epochs=2, extra=(), dropout=0):
    args = ["train", "--dataset", dataset, "--output-dir", out, "--layers", layers, "--units", units]
    args += ["--dropout", dropout, "--part", part, *TRAIN_ARGS, *extra]
    i = args.index("--epochs")
    args[i + 1] = str(epochs)
    return [str(a) for a in args]


# --------------------------------------------------------------------------- #
# small data helpers
# --------------------------------------------------------------------------- #
def write_table(path, X, genes, samples, sep=None) -> None:
    """Genes x samples text table: first column ``id``; ``X`` is ``(n_samples, n_genes)``."""
    path = Path(path)
    sep = sep or ("," if ".csv" in path.suffixes else "\t")
    df = pd.DataFrame(np.asarray(X).T, columns=list(samples))
    df.insert(0, "id", list(genes))
    df.to_csv(path, sep=sep, index=False, float_format="%.7g")


def bundle_landmarks(bundle) -> pd.DataFrame:
    return pd.read_csv(Path(bundle, "landmarks.tsv"), sep="\t", dtype=str, keep_default_na=False)


def bundle_targets(bundle) -> pd.DataFrame:
    return pd.read_csv(Path(bundle, "targets.tsv"), sep="\t", dtype=str, keep_default_na=False)


def read_gctx(path):
    """``(data (n_samples, n_genes), row_ids, col_ids)`` straight from the HDF5 layout."""
    with h5py.File(path, "r") as h5:
        data = h5["0/DATA/0/matrix"][()]
        rows = [v.decode() for v in h5["0/META/ROW/id"][()]]
        cols = [v.decode() for v in h5["0/META/COL/id"][()]]
    return data, rows, cols


def copy_gctx_modified(src, dst, data=None, rows=None, cols=None, transpose=False) -> None:
    """Rewrite a GCTX with replaced data/ids (written with h5py directly, so any damage is allowed)."""
    d0, r0, c0 = read_gctx(src)
    data = d0 if data is None else data
    rows = r0 if rows is None else rows
    cols = c0 if cols is None else cols
    with h5py.File(dst, "w") as h5:
        h5.attrs["version"] = "GCTX1.0"
        h5["0/DATA/0/matrix"] = (np.asarray(data).T if transpose else np.asarray(data)).astype(np.float32)
        h5["0/META/ROW/id"] = np.array([str(r).encode() for r in rows], dtype="S")
        h5["0/META/COL/id"] = np.array([str(c).encode() for c in cols], dtype="S")


# --------------------------------------------------------------------------- #
# oracles
# --------------------------------------------------------------------------- #
def numpy_predict(bundle, X, present=None) -> np.ndarray:
    """Independent forward pass of a bundle: targets ``(n, T)`` on the expression scale.

    ``X`` ``(n, L)`` log2 landmark values in bundle order; landmarks not in
    ``present`` (indices) get the training mean (0 after standardisation).
    Reads bundle.json, stats.npz and the raw state dicts with numpy/torch only.
    """
    import torch

    bundle = Path(bundle)
    info = json.loads((bundle / "bundle.json").read_text())
    st = np.load(bundle / "stats.npz")
    eps = float(st["epsilon"])
    z = (np.asarray(X, np.float64) - st["landmark_mean"]) / (st["landmark_std"] + eps)
    if present is not None:
        keep = np.zeros(z.shape[1], bool)
        keep[np.asarray(present)] = True
        z[:, ~keep] = 0.0
    T = int(info["architecture"]["n_targets"])
    out = np.empty((len(z), T))
    for p in info["parts"]:
        sd = torch.load(bundle / p["file"], map_location="cpu", weights_only=True)["state_dict"]
        sd = {k: v.double().numpy() for k, v in sd.items()}
        h = z
        k = 0
        while f"hidden.{k}.weight" in sd:
            h = np.tanh(h @ sd[f"hidden.{k}.weight"].T + sd[f"hidden.{k}.bias"])
            k += 1
        y = h @ sd["output.weight"].T + sd["output.bias"]
        s, n = int(p["target_start"]), int(p["n_targets"])
        out[:, s : s + n] = y
    return out * (st["target_std"] + eps) + st["target_mean"]


def lstsq_predict(X_tr, Y_tr, X_te) -> np.ndarray:
    """Ordinary least squares with intercept (float64), the LR baseline's definition."""
    A = np.hstack([np.asarray(X_tr, np.float64), np.ones((len(X_tr), 1))])
    W, *_ = np.linalg.lstsq(A, np.asarray(Y_tr, np.float64), rcond=None)
    return np.hstack([np.asarray(X_te, np.float64), np.ones((len(X_te), 1))]) @ W


def adjusted_r2(X, Y) -> np.ndarray:
    """Per-column adjusted R² of least squares with intercept of ``Y`` ``(n, t)`` on ``X`` ``(n, p)``."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n, p = X.shape
    pred = lstsq_predict(X, Y, X)
    rss = ((Y - pred) ** 2).sum(0)
    tss = ((Y - Y.mean(0)) ** 2).sum(0)
    r2 = 1 - rss / tss
    return 1 - (1 - r2) * (n - 1) / (n - p - 1)


def h5_arrays(path) -> dict:
    """Every dataset of an HDF5 file as numpy arrays (for equality checks of processed datasets)."""
    out = {}
    with h5py.File(path, "r") as h5:
        h5.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def same_h5(a, b, rtol=1e-6, atol=1e-6, skip=()) -> str | None:
    """None if the two HDF5 files hold the same datasets and values; else what differs."""
    x, y = h5_arrays(a), h5_arrays(b)
    names = sorted(set(x) | set(y))
    for name in names:
        if any(name.startswith(s) for s in skip):
            continue
        if name not in x or name not in y:
            return f"dataset /{name} only in {'the first' if name in x else 'the second'} file"
        u, v = x[name], y[name]
        if u.shape != v.shape:
            return f"/{name}: shape {u.shape} vs {v.shape}"
        if u.dtype.kind in "fc":
            if not np.allclose(u, v, rtol=rtol, atol=atol, equal_nan=True):
                return f"/{name}: values differ (max |diff| {np.nanmax(np.abs(u - v)):.3g})"
        elif not np.array_equal(u, v):
            return f"/{name}: values differ"
    return None
