"""`dgex train`: outputs, checkpoint selection, determinism, resume after kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_one_line_error, run_dgex, train_argv
from dgex.checkpoints import load_weights
from dgex.errors import InputError
from dgex.train import train
from dgex.training.plan import ClassicalMomentumSGD
from helpers_dataset import write_dataset_arrays, write_toy_dataset

SMALL = dict(layers=2, units=16, dropout=0.1, epochs=6, batch_size=50, monitor_size=100, progress=False, threads=1)


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("toy") / "toy.h5"
    return write_toy_dataset(path, n_tr=300, n_landmarks=12, n_targets=16, nonlinear=0.5, n_parts=2)


def _train(toy, out, **kw):
    return train(dataset=toy["path"], output_dir=out, **{**SMALL, "part": 0, **kw})


def test_run_outputs_and_checkpoint_selection(toy, tmp_path):
    summary = _train(toy, tmp_path / "run")
    run = tmp_path / "run"
    for name in ("best_geo-va.pt", "best_1000g-va.pt", "history.csv", "per_gene.csv", "run.json"):
        assert (run / name).exists(), name
    assert not (run / "last.ckpt").exists()  # removed after success unless --keep-last
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["epoch"]) == list(range(1, 7))
    assert {"lr", "train_loss", "monitor_mae", "geo-va", "geo-te", "1000g-va", "gtex-te"} <= set(hist.columns)
    # each checkpoint is the epoch with the lowest error on its own validation set
    for sel in ("geo-va", "1000g-va"):
        best_epoch = int(hist.loc[hist[sel].idxmin(), "epoch"])
        assert summary["best"][sel]["epoch"] == best_epoch
        _, blob = load_weights(run / f"best_{sel}.pt")
        assert blob["epoch"] == best_epoch
    # per-gene errors of the selected model reproduce the logged epoch MAE
    pg = pd.read_csv(run / "per_gene.csv")
    assert {"ensembl", "symbol", "method", "selected_by", "split", "mae", "r", "rho"} <= set(pg.columns)
    for sel in ("geo-va", "1000g-va"):
        row = pg[(pg.selected_by == sel) & (pg.split == sel)]
        assert len(row) == 8  # part 0 of 16 targets
        np.testing.assert_allclose(row["mae"].mean(), hist[sel].min(), rtol=1e-4)
    info = json.loads((run / "run.json").read_text())
    assert info["parameters"] == 12 * 16 + 16 + 16 * 16 + 16 + 16 * 8 + 8
    assert info["epochs"] == 6 and info["profiles_per_second"] > 0
    # the default device "auto" is a GPU where torch sees one, else the CPU
    if torch.cuda.is_available():
        assert info["device"] in {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    else:
        assert info["device"] == "cpu"
    assert info["config"]["layers"] == 2 and info["config"]["seed"] == 0


def record_step_rates(monkeypatch) -> list[dict]:
    """Patch the optimizer so that every step appends ``{group name: learning rate}`` it is about to use."""
    seen: list[dict] = []
    step = ClassicalMomentumSGD.step

    def recording_step(self, closure=None):
        seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return step(self, closure)

    monkeypatch.setattr(ClassicalMomentumSGD, "step", recording_step)
    return seen


def paper_rates(base: float, monitor: np.ndarray, decay: float, floor: float) -> list[float]:
    """The paper's rule restated: the rate of epoch e is x decay (not below floor) if monitor rose in e-1 vs e-2."""
    rates = [base]
    for e in range(1, len(monitor)):
        rose = e >= 2 and monitor[e - 1] > monitor[e - 2]
        rates.append(max(rates[-1] * decay, floor) if rose else rates[-1])
    return rates


@pytest.mark.parametrize("decay,floor", [(0.9, 1e-5), (0.7, 0.05)])
def test_learning_rate_decays_only_after_monitor_rises(toy, tmp_path, monkeypatch, decay, floor):
    # lr 0.1 on this toy problem: the monitored MAE rises in some epochs and falls in others
    steps = record_step_rates(monkeypatch)
    _train(toy, tmp_path / "run", epochs=12, lr=0.1, lr_decay=decay, lr_min=floor, device="cpu")
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    expected = paper_rates(0.1, hist["monitor_mae"].to_numpy(), decay, floor)
    # the test must see the rule act both ways
    changed = np.diff(expected) != 0
    assert changed.sum() >= 2 and (~changed).sum() >= 2, expected
    if floor > 1e-5:  # ... and hold the floor when a rise comes at the floor
        rose_at_floor = [
            e
            for e in range(2, 12)
            if expected[e - 1] == floor and hist["monitor_mae"][e - 1] > hist["monitor_mae"][e - 2]
        ]
        assert rose_at_floor and all(expected[e] == floor for e in rose_at_floor), expected
    np.testing.assert_allclose(hist["lr"], expected, rtol=1e-12)
    # what the optimizer actually used, every step: the base rate, and 3x on the deeper weights
    per_epoch = len(steps) // 12
    assert len(steps) == 12 * per_epoch == 12 * 6
    for i, used in enumerate(steps):
        assert used["base"] == pytest.approx(expected[i // per_epoch], rel=1e-12), (i, used)
        assert used["deep_weights"] == pytest.approx(3 * expected[i // per_epoch], rel=1e-12), (i, used)


def test_seeded_reruns_are_bit_identical(toy, tmp_path):
    _train(toy, tmp_path / "a", seed=3)
    _train(toy, tmp_path / "b", seed=3)
    _train(toy, tmp_path / "c", seed=4)
    wa = torch.load(tmp_path / "a" / "best_geo-va.pt", weights_only=False)["state_dict"]
    wb = torch.load(tmp_path / "b" / "best_geo-va.pt", weights_only=False)["state_dict"]
    wc = torch.load(tmp_path / "c" / "best_geo-va.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    cols = ["epoch", "lr", "train_loss", "monitor_mae", "geo-va", "gtex-te"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "a" / "history.csv")[cols], pd.read_csv(tmp_path / "b" / "history.csv")[cols]
    )


def test_joint_network_over_all_targets(toy, tmp_path):
    summary = _train(toy, tmp_path / "run", part=None, epochs=2)
    assert summary["n_targets"] == 16


def test_adamw_option_trains(toy, tmp_path):
    summary = _train(toy, tmp_path / "run", optimizer="adamw", lr=1e-3, epochs=3)
    hist = pd.read_csv(tmp_path / "run" / "history.csv")
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]
    assert summary["config"]["optimizer"] == "adamw"


def test_kill_dash_nine_then_resume_reaches_the_same_result(toy, tmp_path):
    net = dict(layers=2, units=64, dropout=0.1, part=1)
    recipe = dict(epochs=14, batch_size=10, monitor_size=100, seed=5, threads=1, checkpoint_interval=0)
    args = train_argv(toy["path"], **net, **recipe, device="cpu", no_progress=True)
    ref = run_dgex(*args, "--output-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "crash"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dgex", *map(str, args), "--output-dir", str(out), "--resume"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once a few epochs are checkpointed, well before the end
        hist = out / "history.csv"
        if (out / "last.ckpt").exists() and hist.exists() and len(hist.read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len((out / "history.csv").read_text().splitlines()) - 1
    assert 3 <= done < 14, f"kill came too late or too early ({done} epochs done)"
    assert not (out / "run.json").exists()

    res = run_dgex(*args, "--output-dir", out, "--resume")
    assert res.returncode == 0, res.stderr
    a, b = (json.loads((d / "run.json").read_text()) for d in (tmp_path / "ref", out))
    assert a["best"] == b["best"]
    cols = ["epoch", "lr", "train_loss", "monitor_mae", "geo-va", "geo-te", "1000g-va", "gtex-te"]
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "ref" / "history.csv")[cols], pd.read_csv(out / "history.csv")[cols]
    )
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ref" / "per_gene.csv"), pd.read_csv(out / "per_gene.csv"))


def test_resume_with_other_hyper_parameters_is_refused(toy, tmp_path):
    base = dict(layers=1, units=8, dropout=0, part=0, epochs=2, monitor_size=50, keep_last=True, no_progress=True)
    assert run_dgex(*train_argv(toy["path"], tmp_path / "run", **base)).returncode == 0
    assert (tmp_path / "run" / "last.ckpt").exists()
    res = run_dgex(*train_argv(toy["path"], tmp_path / "run", **{**base, "units": 16}), "--resume")
    assert_one_line_error(res, "cannot resume", "units: 8 -> 16")
    # more epochs with the same hyper-parameters is a valid continuation
    res = run_dgex(*train_argv(toy["path"], tmp_path / "run", **{**base, "epochs": 4}), "--resume")
    assert res.returncode == 0, res.stderr
    assert len(pd.read_csv(tmp_path / "run" / "history.csv")) == 4


def test_dataset_genes_must_match_the_checkpoint(toy, tmp_path):
    _train(toy, tmp_path / "run", epochs=1, keep_last=True)
    # same shapes, different target genes
    other = write_dataset_arrays(
        tmp_path / "other.h5",
        toy["splits"],
        parts=np.sort(np.arange(16) % 2),
        target_ids=[f"ENSG7{i:010d}" for i in range(16)],
    )
    with pytest.raises(InputError, match="targets of the checkpoint do not match"):
        from dgex.dataset import ProcessedDataset

        with ProcessedDataset(other) as ds:
            g = ds.genes()
        t = g.targets[g.targets.part == 0]
        load_weights(
            tmp_path / "run" / "best_geo-va.pt",
            gene_ids={"landmarks": g.landmarks.ensembl.tolist(), "targets": t.ensembl.tolist()},
        )
    recipe = dict(epochs=2, batch_size=50, monitor_size=100, resume=True, no_progress=True)
    res = run_dgex(*train_argv(other, tmp_path / "run", layers=2, units=16, dropout=0.1, part=0, **recipe))
    assert_one_line_error(res, "other landmark/target genes")


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--units", "0", "--units: must be >= 1"),
        ("--dropout", "1.5", "--dropout: must be in [0, 1)"),
        ("--layers", "0", "--layers: must be >= 1"),
        ("--part", "7", "--part 7 does not exist"),
    ],
)
def test_invalid_grid_values_are_one_line_errors(toy, tmp_path, flag, value, message):
    grid = {"layers": "2", "units": "8", "dropout": "0.1", "part": "0"}
    grid[flag.removeprefix("--")] = value
    res = run_dgex(*train_argv(toy["path"], tmp_path / "run", epochs=1, **grid, no_progress=True))
    assert res.returncode == 2
    assert message in res.stderr, res.stderr
    assert not (tmp_path / "run" / "run.json").exists()


def test_four_layers_are_allowed(toy, tmp_path):
    summary = _train(toy, tmp_path / "run", layers=4, epochs=1)
    assert summary["config"]["layers"] == 4


def test_nan_loss_stops_with_epoch_and_learning_rate(toy, tmp_path):
    recipe = dict(epochs=30, lr=50, monitor_size=50, no_progress=True)  # a rate far too high
    res = run_dgex(*train_argv(toy["path"], tmp_path / "run", layers=1, units=16, dropout=0, part=0, **recipe))
    err = assert_one_line_error(res, "training diverged at epoch", "at learning rate", "lower --lr")
    assert "best checkpoints so far are kept" in err
    epoch = int(err.split("at epoch ")[1].split(":")[0])
    if epoch > 1:  # epochs before the divergence left their best checkpoint
        assert (tmp_path / "run" / "best_geo-va.pt").exists()
    assert not (tmp_path / "run" / "run.json").exists()


def test_missing_dataset_is_one_line_error(tmp_path):
    res = run_dgex(*train_argv(tmp_path / "nope.h5", tmp_path / "run", layers=1, units=8, dropout=0, part=0))
    assert_one_line_error(res, "processed dataset not found", "dgex preprocess")
