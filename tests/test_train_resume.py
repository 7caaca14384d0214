"""`dgex train --resume`: which checkpoints may be continued, and that continuing gives the uninterrupted result.

* the dataset fingerprint (what it hashes, that preprocess stores it, what it ignores);
* checkpoints that must not be continued -- another dataset (other splits, a missing split), other
  hyper-parameters, a truncated or corrupt file, more epochs done than asked for -- are a one-line
  error on the CLI and a logged restart from scratch with ``--restart-incompatible`` (the workflow);
* resuming after a learning-rate decay restores both rates (3x on the deeper weights) and the result;
* ``kill -9`` at chosen points of a run, then the same command: identical results, no leftover files;
* NaN/Inf inside a processed dataset is a damaged dataset, not a diverged training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import dgex.dataset
from conftest import REPO, assert_one_line_error, make_geo, run_dgex
from dgex.dataset import ProcessedDataset, content_fingerprint, fingerprint_differences
from dgex.errors import ConfigError, InputError
from dgex.preprocess import preprocess
from dgex.train import CannotResume, train
from helpers_dataset import write_dataset_arrays, write_toy_dataset
from test_train import paper_rates, record_step_rates

KW = dict(
    layers=2, units=16, dropout=0.1, part=0, batch_size=50, monitor_size=100, progress=False, device="cpu", threads=1
)


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


FINISHED = {"best_geo-va.pt", "best_1000g-va.pt", "history.csv", "per_gene.csv", "run.json"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.h5"
    return write_toy_dataset(path, n_tr=300, n_landmarks=12, n_targets=16, nonlinear=0.5, n_parts=2)


# One process imports torch and Lightning once and forks a child per `dgex` command, which runs the CLI's
# own main (exit status and stderr as from `python -m dgex`) without paying the imports again.  A child
# can SIGKILL itself at a chosen point: a real kill -9 (no cleanup, no finally) at a reproducible place.
ZYGOTE = r"""
import contextlib, json, os, signal, sys, traceback
from pathlib import Path
import torch, pytorch_lightning
import dgex.cli, dgex.io, dgex.metrics, dgex.train, dgex.training.plan

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def arm(point):
    kind = point["kind"]
    if kind == "step":  # before the n-th optimizer step of this process
        step, count = dgex.training.plan.ClassicalMomentumSGD.step, [0]
        def killing_step(self, closure=None):
            count[0] += 1
            if count[0] == point["n"]:
                die()
            return step(self, closure)
        dgex.training.plan.ClassicalMomentumSGD.step = killing_step
    elif kind in ("writing", "written"):  # the n-th atomic write of a file: before / after its rename
        real, count = dgex.io.atomic_path, [0]
        @contextlib.contextmanager
        def killing_atomic_path(path):
            hit = False
            if Path(path).name == point["file"]:
                count[0] += 1
                hit = count[0] == point["n"]
            with real(path) as tmp:
                yield tmp
                if hit and kind == "writing":
                    die()
            if hit and kind == "written":
                die()
        for module in (dgex.io, dgex.metrics):
            module.atomic_path = killing_atomic_path
    elif kind == "call":  # on entering a function that dgex.train calls
        setattr(dgex.train, point["name"], lambda *a, **k: die())

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = 1
        try:
            if job["kill"]:
                arm(job["kill"])
            code = dgex.cli.main(job["argv"])
        except BaseException:
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    """``forker(argv, kill=None)``: run ``dgex <argv>`` in a forked child; returns its exit code and output."""
    proc = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,  # its own process group: one killpg ends it and any child
    )
    logs = tmp_path_factory.mktemp("forker")
    count = [0]

    def run(argv, kill=None) -> subprocess.CompletedProcess:
        count[0] += 1
        log = logs / f"{count[0]}.log"
        proc.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(log), "kill": kill}) + "\n")
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], 300)[0]:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"dgex {' '.join(map(str, argv))} did not finish in 300 s")
        code = int(proc.stdout.readline())
        return subprocess.CompletedProcess(argv, code, stdout="", stderr=log.read_text())

    yield run
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cli_args(dataset, out, **kw):
    """`dgex train` arguments equivalent to ``train(dataset, out, **{**KW, **kw})`` (bool kw = flags)."""
    args = ["train", "--dataset", dataset, "--output-dir", out]
    for k, v in {**KW, **kw}.items():
        if k == "progress":
            args += [] if v else ["--no-progress"]
        elif v is True:
            args.append("--" + k.replace("_", "-"))
        elif v is not False:
            args += ["--" + k.replace("_", "-"), v]
    return [str(a) for a in args]


def assert_same_run(a, b):
    """Two run folders hold the same training: history (but wall times), per-gene errors, best weights."""
    ha, hb = (pd.read_csv(d / "history.csv").drop(columns="seconds") for d in (a, b))
    pd.testing.assert_frame_equal(ha, hb)
    pd.testing.assert_frame_equal(pd.read_csv(a / "per_gene.csv"), pd.read_csv(b / "per_gene.csv"))
    names = sorted(p.name for p in a.glob("best_*.pt"))
    assert names and names == sorted(p.name for p in b.glob("best_*.pt"))
    for name in names:
        wa, wb = (torch.load(d / name, weights_only=False) for d in (a, b))
        assert wa["epoch"] == wb["epoch"] and wa["dataset_fingerprint"] == wb["dataset_fingerprint"]
        assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"]), name
    ja, jb = (json.loads((d / "run.json").read_text()) for d in (a, b))
    assert ja["best"] == jb["best"] and ja["final_lr"] == jb["final_lr"]
    assert ja["dataset_fingerprint"] == jb["dataset_fingerprint"]


# ------------------------------------------------------------------ the fingerprint
def test_fingerprint_hashes_every_component_in_blocks(toy, monkeypatch):
    monkeypatch.setattr(dgex.dataset, "_BLOCK_BYTES", 1000)  # many blocks per array, a partial last one

    with h5py.File(toy["path"], "r") as h5:
        fp = content_fingerprint(h5)

        def oracle(*names):
            h = hashlib.sha256()
            for name in names:
                a = h5[name][()]
                h.update(f"/{name}|{a.dtype.str}|{a.shape}\n".encode() + a.tobytes())
            return h.hexdigest()

        expected = {f"{s}/{w}": oracle(f"splits/{s}/{w}") for s in toy["splits"] for w in ("ids", "X", "Y")}
        genes = sorted(f"genes/{r}/{k}" for r in ("landmark", "target") for k in h5[f"genes/{r}"])
        expected["genes"] = oracle(*genes)
        expected["stats"] = oracle(*sorted(f"stats/{s}/{k}" for s in h5["stats"] for k in ("mean", "std")))
        expected["reference"] = oracle("reference/gene_quantiles")
    settings = {"epsilon": 1e-3, "format": 1, "standardize": "all"}
    expected["settings"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    assert fp["components"] == expected
    assert fp["sha256"] == hashlib.sha256(json.dumps([1, expected], sort_keys=True).encode()).hexdigest()
    with ProcessedDataset(toy["path"]) as ds:  # no stored attribute: computed the same way
        assert ds.fingerprint() == fp


def test_fingerprint_follows_content_not_paths_or_versions(toy, tmp_path):
    path = tmp_path / "copy.h5"
    shutil.copy(toy["path"], path)
    with ProcessedDataset(toy["path"]) as ds:
        fp = ds.fingerprint()
    with h5py.File(path, "a") as h5:
        h5.attrs["params"] = json.dumps({"geo": "/elsewhere/geo.gctx", "chunk_size": 7})
        h5.attrs["dgex_version"] = "9.9"
    with ProcessedDataset(path) as ds:
        assert ds.fingerprint() == fp
    with h5py.File(path, "a") as h5:
        h5["splits/gtex-te/Y"][5, 3] += np.float32(1e-3)
    with ProcessedDataset(path) as ds:
        changed = ds.fingerprint()
    assert fingerprint_differences(fp, changed) == ["other values in gtex-te"]
    with h5py.File(path, "a") as h5:
        del h5["splits/1000g-va"]
        h5.attrs["epsilon"] = 1e-2
    with ProcessedDataset(path) as ds:
        assert fingerprint_differences(fp, ds.fingerprint()) == [
            "no split 1000g-va",
            "other values in gtex-te",
            "other standardisation settings",
        ]


def _preprocess(tiny_maps, tmp_path, name, **kw):
    args = dict(
        geo=tmp_path / "geo.gctx",
        output=tmp_path / name / "dataset.h5",
        landmarks=tiny_maps["landmarks"],
        targets=tiny_maps["targets"],
        dedup_clusters=5,
        chunk_size=37,
        progress=False,
    )
    preprocess(**{**args, **kw})
    return args["output"]


def test_preprocess_stores_a_fingerprint_that_sees_the_split_seed(tmp_path, tiny_maps):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=150)
    a = _preprocess(tiny_maps, tmp_path, "a")
    again = _preprocess(tiny_maps, tmp_path, "again")  # another output path (and params attribute)
    other_split = _preprocess(tiny_maps, tmp_path, "split1", split_seed=1)
    other_parts = _preprocess(tiny_maps, tmp_path, "parts1", part_seed=1)
    fps = {}
    for path in (a, again, other_split, other_parts):
        with h5py.File(path, "r") as h5:
            stored = json.loads(h5.attrs["fingerprint"])
            assert stored == content_fingerprint(h5)  # written last: matches the finished file
        fps[path] = stored
    assert fps[again] == fps[a]
    # another split seed moves samples between the GEO splits; the (all-profile) statistics stay
    assert fingerprint_differences(fps[a], fps[other_split]) == [
        f"other samples in {s}" for s in ("geo-tr", "geo-va", "geo-te")
    ]
    assert "other genes or target parts" in fingerprint_differences(fps[a], fps[other_parts])


# ------------------------------------------------------------------ checkpoints that must not be continued
def test_resume_on_other_splits_is_refused_or_restarted(forker, tmp_path, tiny_maps, caplog):
    make_geo(tmp_path / "geo.gctx", tiny_maps["probes"], n_samples=150)
    seed0, seed1 = _preprocess(tiny_maps, tmp_path, "s0"), _preprocess(tiny_maps, tmp_path, "s1", split_seed=1)
    kw = dict(KW, batch_size=20, epochs=2)
    run = tmp_path / "run"
    train(dataset=seed0, output_dir=run, keep_last=True, **kw)
    res = forker(cli_args(seed1, run, epochs=2, batch_size=20, resume=True))
    assert_one_line_error(
        res, f"cannot resume {run}", "another dataset", "other samples in geo-tr", "delete the run folder"
    )
    assert (run / "last.ckpt").exists()  # an error changes nothing

    with caplog.at_level(logging.WARNING, logger="dgex.train"):
        train(dataset=seed1, output_dir=run, resume=True, restart_incompatible=True, **kw)
    assert "other samples in geo-tr" in caplog.text and "training from scratch" in caplog.text
    train(dataset=seed1, output_dir=tmp_path / "fresh", **kw)
    assert_same_run(run, tmp_path / "fresh")


def _geo_only(toy, path):
    """The toy dataset without its RNA-seq splits (same genes, same GEO splits)."""
    geo = {k: v for k, v in toy["splits"].items() if k.startswith("geo")}
    return write_dataset_arrays(path, geo, overlap=np.arange(16) < 3, parts=np.sort(np.arange(16) % 2))


def test_resume_without_a_split_the_checkpoint_tracked(forker, toy, tmp_path):
    run = tmp_path / "run"
    train(dataset=toy["path"], output_dir=run, epochs=1, keep_last=True, **KW)
    res = forker(cli_args(_geo_only(toy, tmp_path / "geo.h5"), run, epochs=2, resume=True))
    assert_one_line_error(res, "another dataset", "no split 1000g-va, no split gtex-te")


def test_other_hyper_parameters_restart_in_workflow_mode(toy, tmp_path, caplog):
    run = tmp_path / "run"
    train(dataset=toy["path"], output_dir=run, epochs=2, keep_last=True, **{**KW, "units": 8})
    with caplog.at_level(logging.WARNING, logger="dgex.train"):
        train(dataset=toy["path"], output_dir=run, epochs=2, resume=True, restart_incompatible=True, **KW)
    assert "units: 8 -> 16" in caplog.text and "training from scratch" in caplog.text
    train(dataset=toy["path"], output_dir=tmp_path / "fresh", epochs=2, **KW)
    assert_same_run(run, tmp_path / "fresh")
    with pytest.raises(ConfigError, match="only applies together with --resume"):
        train(dataset=toy["path"], output_dir=run, epochs=2, restart_incompatible=True, **KW)


@pytest.mark.parametrize(
    "name,damage",
    [(n, d) for n in ("last.ckpt", "best_geo-va.pt") for d in ("truncated", "empty", "garbage")]
    + [("best_geo-va.pt", "deleted")],  # (no last.ckpt is a plain fresh start)
)
def test_corrupt_checkpoint(forker, toy, tmp_path, caplog, name, damage):
    run = tmp_path / "run"
    train(dataset=toy["path"], output_dir=run, epochs=2, keep_last=True, **KW)
    path = run / name
    blob = path.read_bytes()
    if damage == "deleted":
        path.unlink()
    else:
        path.write_bytes({"truncated": blob[: len(blob) // 2], "empty": b"", "garbage": os.urandom(len(blob))}[damage])
    what = "is missing" if damage == "deleted" else "is truncated or corrupt"
    if damage == "truncated":  # the CLI: one line naming the file and the fix
        res = forker(cli_args(toy["path"], run, epochs=3, resume=True))
        assert_one_line_error(res, f"cannot resume {run}: {path}", what, "delete")
    else:
        with pytest.raises(CannotResume, match=what):
            train(dataset=toy["path"], output_dir=run, epochs=3, resume=True, **KW)
    with caplog.at_level(logging.WARNING, logger="dgex.train"):
        train(dataset=toy["path"], output_dir=run, epochs=3, resume=True, restart_incompatible=True, **KW)
    assert what in caplog.text and "training from scratch" in caplog.text
    train(dataset=toy["path"], output_dir=tmp_path / "fresh", epochs=3, **KW)
    assert_same_run(run, tmp_path / "fresh")


def test_more_epochs_done_than_asked_for(forker, toy, tmp_path, caplog):
    run = tmp_path / "run"
    train(dataset=toy["path"], output_dir=run, epochs=4, keep_last=True, **KW)
    res = forker(cli_args(toy["path"], run, epochs=2, resume=True))
    assert_one_line_error(res, "4 epochs done, more than --epochs 2", "--epochs 4 or more", "from scratch")
    with caplog.at_level(logging.WARNING, logger="dgex.train"):
        train(dataset=toy["path"], output_dir=run, epochs=2, resume=True, restart_incompatible=True, **KW)
    assert "4 epochs done" in caplog.text
    train(dataset=toy["path"], output_dir=tmp_path / "fresh", epochs=2, **KW)
    assert_same_run(run, tmp_path / "fresh")


def test_checkpoint_of_an_older_dgex_without_fingerprint(toy, tmp_path):
    run = tmp_path / "run"
    train(dataset=toy["path"], output_dir=run, epochs=1, keep_last=True, **KW)
    ckpt = torch.load(run / "last.ckpt", weights_only=False)
    del ckpt["dgex"]["dataset"]
    torch.save(ckpt, run / "last.ckpt")
    with pytest.raises(CannotResume, match="records no dataset fingerprint"):
        train(dataset=toy["path"], output_dir=run, epochs=2, resume=True, **KW)


def test_fresh_start_removes_an_earlier_runs_files_and_dead_temps(toy, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in FINISHED:  # an earlier run's files, one of which this GEO-only run will not write
        (run / name).write_text("stale")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_tmp = run / f".last.ckpt.{int(dead.stdout)}.tmp"
    live_tmp = run / f".history.csv.{os.getppid()}.tmp"  # a live writer's file stays
    dead_tmp.write_text("x")
    live_tmp.write_text("x")
    geo_only = _geo_only(toy, tmp_path / "geo.h5")
    train(dataset=geo_only, output_dir=run, epochs=1, resume=True, **KW)  # nothing to resume: from scratch
    assert {p.name for p in run.iterdir()} == FINISHED - {"best_1000g-va.pt"} | {live_tmp.name}
    assert all((run / n).read_bytes() != b"stale" for n in FINISHED - {"best_1000g-va.pt"})


# ------------------------------------------------------------------ resuming after a decay
class SimulatedCrash(Exception):
    pass


def test_resume_after_a_decay_restores_both_rates_and_the_result(toy, tmp_path, monkeypatch):
    kw = dict(KW, epochs=12, lr=0.1)  # this rate decays in this toy (see test_train's decay test)
    train(dataset=toy["path"], output_dir=tmp_path / "ref", **kw)
    ref = pd.read_csv(tmp_path / "ref" / "history.csv")
    rates = paper_rates(0.1, ref["monitor_mae"].to_numpy(), 0.9, 1e-5)
    first_decayed = next(e for e, r in enumerate(rates) if r < 0.1)  # 0-based epoch that ran at a decayed rate
    crash_after = first_decayed + 1  # epochs checkpointed before the crash; the next one runs at a decayed rate

    from dgex.training.logger import HistoryLogger

    write_history = HistoryLogger.write

    def crashing_write_history(self):
        if len(self.rows) == crash_after + 1:  # the end of the next epoch, before its checkpoint
            raise SimulatedCrash
        write_history(self)

    run = tmp_path / "run"
    monkeypatch.setattr(HistoryLogger, "write", crashing_write_history)
    with pytest.raises(SimulatedCrash):
        train(dataset=toy["path"], output_dir=run, checkpoint_interval=0, resume=True, **kw)
    monkeypatch.setattr(HistoryLogger, "write", write_history)
    assert not (run / "run.json").exists()
    ckpt = torch.load(run / "last.ckpt", weights_only=False)
    assert len(ckpt["dgex"]["history"]) == crash_after
    saved = {g["name"]: g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]}
    assert ckpt["dgex"]["lr"] == pytest.approx(rates[crash_after]) and rates[crash_after] < 0.1
    assert saved == pytest.approx({"base": rates[crash_after], "deep_weights": 3 * rates[crash_after]})

    steps = record_step_rates(monkeypatch)
    train(dataset=toy["path"], output_dir=run, checkpoint_interval=0, resume=True, **kw)
    # every step after the restart used the decayed rates, 3x on the deeper weights
    assert len(steps) == (12 - crash_after) * 6
    for i, used in enumerate(steps):
        rate = rates[crash_after + i // 6]
        assert used == pytest.approx({"base": rate, "deep_weights": 3 * rate}), (i, used)
    assert_same_run(run, tmp_path / "ref")


# ------------------------------------------------------------------ kill -9 at chosen points
EPOCHS, STEPS = 5, 6  # 300 training profiles in batches of 50
KILL_POINTS = {
    "epoch 1, before any checkpoint": {"kind": "step", "n": 3},
    "right after the first checkpoint": {"kind": "written", "file": "last.ckpt", "n": 1},
    "mid-epoch 3": {"kind": "step", "n": 2 * STEPS + 4},
    "writing a checkpoint": {"kind": "writing", "file": "last.ckpt", "n": 3},
    "writing best weights": {"kind": "writing", "file": "best_geo-va.pt", "n": 2},
    "writing history.csv": {"kind": "writing", "file": "history.csv", "n": 4},
    "final evaluation": {"kind": "call", "name": "per_gene_frame"},
    "writing per_gene.csv": {"kind": "writing", "file": "per_gene.csv", "n": 1},
    "after run.json, before last.ckpt is removed": {"kind": "written", "file": "run.json", "n": 1},
}


def _kill_argv(toy, out):
    return cli_args(toy["path"], out, part=1, epochs=EPOCHS, seed=5, threads=1, checkpoint_interval=0, resume=True)


@pytest.fixture(scope="module")
def uninterrupted(toy, forker, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    res = forker(_kill_argv(toy, out))
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_dash_nine_then_the_same_command(toy, forker, uninterrupted, tmp_path, point):
    out = tmp_path / "run"
    res = forker(_kill_argv(toy, out), kill=KILL_POINTS[point])
    assert res.returncode == -9, res.stderr  # the kill point was reached
    left = {p.name for p in out.iterdir()}
    if KILL_POINTS[point]["kind"] == "writing":  # the dead writer's temporary file is there ...
        assert any(n.startswith(f".{KILL_POINTS[point]['file']}~") and n.endswith(".tmp") for n in left), left
    assert ("run.json" in left) == point.startswith("after run.json")

    res = forker(_kill_argv(toy, out))
    assert res.returncode == 0, res.stderr
    assert {p.name for p in out.iterdir()} == FINISHED  # ... and gone, as is last.ckpt
    assert_same_run(out, uninterrupted)


# ------------------------------------------------------------------ NaN inside a processed dataset
@pytest.mark.parametrize("split,what,value", [("geo-tr", "X", np.nan), ("geo-va", "Y", np.inf)])
def test_non_finite_dataset_values_are_a_damaged_dataset(forker, toy, tmp_path, split, what, value):
    path = tmp_path / "damaged.h5"
    shutil.copy(toy["path"], path)
    with h5py.File(path, "a") as h5:
        h5[f"splits/{split}/{what}"][17, 2] = value
        h5[f"splits/{split}/{what}"][40, 0] = value
        first_id = h5[f"splits/{split}/ids"][17].decode()
    res = forker(cli_args(path, tmp_path / "run", epochs=2))
    err = assert_one_line_error(
        res, f"split {split} holds 2 NaN/infinite", f"first in sample {first_id}", "rerun `dgex preprocess`"
    )
    assert "diverged" not in err
    assert not (tmp_path / "run" / "run.json").exists()


def test_finiteness_check_finds_the_first_bad_sample_across_blocks(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(dgex.dataset, "_BLOCK_BYTES", 16 * 4 * 7)  # 7 rows of Y per block
    path = tmp_path / "damaged.h5"
    shutil.copy(toy["path"], path)
    with h5py.File(path, "a") as h5:
        h5["splits/geo-te/Y"][[50, 51, 90], 15] = [np.nan, -np.inf, np.nan]
    with ProcessedDataset(path) as ds:
        ds.Y("geo-te", part=0)  # the damage is in part 1 only
        with pytest.raises(InputError, match="geo-te holds 3 NaN/infinite target .* sample geo-te-50\\)"):
            ds.Y("geo-te")
        with pytest.raises(InputError, match="holds 3 NaN.* sample geo-te-50\\)"):
            ds.Y("geo-te", part=1)


# ------------------------------------------------------------------ the workflow restarts, and says so
@pytest.mark.slow
def test_workflow_restarts_a_run_whose_checkpoint_has_another_dataset(tmp_path):
    cfg = yaml.safe_load((REPO / "config/test.yaml").read_text())
    cfg["results_dir"], cfg["resources_dir"] = str(tmp_path / "results"), str(tmp_path / "resources")
    cfg["grid"] = {"layers": [1], "units": [8], "dropout": [0.0]}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "results" / "test" / "runs" / "dgex" / "1x8_d0.0" / "part0"
    target = run / "run.json"

    def snakemake(*args):
        cmd = [sys.executable, "-m", "snakemake", "--cores", "1", *map(str, args), "--configfile", str(config)]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)

    # the job's own command, with --keep-last: an interrupted run of split seed 0 leaves last.ckpt
    plan = snakemake("-n", "-p", target)
    command = next(ln.strip() for ln in plan.stdout.splitlines() if "-m dgex train" in ln)
    assert "--resume --restart-incompatible" in command, command
    res = snakemake(run.parents[3] / "data" / "dataset.h5")
    assert res.returncode == 0, res.stderr
    argv = shlex.split(command.split(" > ")[0])
    argv = argv[argv.index("train") :]
    assert run_dgex(*argv, "--keep-last").returncode == 0
    for name in ("run.json", "per_gene.csv", "history.csv"):
        (run / name).unlink()

    cfg["preprocess"]["split_seed"] = 1
    config.write_text(yaml.safe_dump(cfg))
    res = snakemake(target)
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "results" / "test" / "logs" / "train" / "1x8_d0.0_part0.log").read_text()
    assert "another dataset" in log and "other samples in geo-tr" in log and "training from scratch" in log
    with ProcessedDataset(run.parents[3] / "data" / "dataset.h5") as ds:
        assert json.loads(target.read_text())["dataset_fingerprint"] == ds.fingerprint()["sha256"]
    assert {p.name for p in run.iterdir()} == FINISHED
