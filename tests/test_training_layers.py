"""The training layer's pieces on their own: one forward pass, the history logger, the data module, the rate rule."""

from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest
import torch

from dgex.bundle import Bundle
from dgex.models import DGEX
from dgex.training.callbacks import PaperLRDecay
from dgex.training.data import DeviceData
from dgex.training.logger import HistoryLogger


def _bundle(n_units=(7, 7), n_in=5, parts=((0, 6), (6, 10)), seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    nets = [DGEX(n_in, b - a, 2, u, dropout=0.3).eval() for (a, b), u in zip(parts, n_units)]
    for net in nets:  # a trained-looking output layer (the initial one is ~1e-4)
        torch.nn.init.normal_(net.output.weight)
    n_out = parts[-1][1]
    stats = {
        "epsilon": 1e-3,
        "landmark_mean": rng.normal(size=n_in),
        "landmark_std": rng.uniform(0.5, 2, n_in),
        "target_mean": rng.normal(size=n_out),
        "target_std": rng.uniform(0.5, 2, n_out),
    }
    bundle = Bundle(
        path=None,
        info={},
        landmarks=pd.DataFrame({"ensembl": [f"L{i}" for i in range(n_in)]}),
        targets=pd.DataFrame({"ensembl": [f"T{i}" for i in range(n_out)]}),
        stats=stats,
        networks=nets,
        part_slices=[slice(a, b) for a, b in parts],
    )
    return bundle.to("cpu"), stats


@pytest.mark.parametrize("n_units", [(7, 7), (7, 4)], ids=["shared-buffers", "no-buffers"])
def test_bundle_predicts_through_the_networks_forward(monkeypatch, n_units):
    """Bundle.predict_tensor runs DGEX.forward (no second copy of the architecture) and gives the
    de-standardised network output: a float64 numpy oracle of tanh layers and the inverse standardisation."""
    bundle, stats = _bundle(n_units)
    calls = []
    forward = DGEX.forward

    def counting_forward(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DGEX, "forward", counting_forward)
    x = np.random.default_rng(1).normal(size=(9, 5)).astype(np.float32)
    got = bundle.predict_tensor(torch.as_tensor(x)).numpy()
    assert len(calls) == len(bundle.networks)

    z = (x - stats["landmark_mean"]) / (stats["landmark_std"] + 1e-3)
    want = np.empty((9, 10))
    for net, sl in zip(bundle.networks, bundle.part_slices):
        h = z
        for layer in net.hidden:
            h = np.tanh(h @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy())
        y = h @ net.output.weight.detach().double().numpy().T + net.output.bias.detach().double().numpy()
        want[:, sl] = y * (stats["target_std"][sl] + 1e-3) + stats["target_mean"][sl]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the bundle's networks themselves keep their weights (the folding works on copies)
    assert all(net.output.weight.abs().max() > 0.5 for net in bundle.networks)


def test_forward_into_buffers_equals_the_plain_forward():
    net = DGEX(6, 3, 3, 8, dropout=0.4).eval()
    x = torch.randn(5, 6)
    buffers = [torch.empty(5, 8) for _ in range(3)]
    with torch.inference_mode():
        y, acts = net(x, return_hidden=True, buffers=buffers)
        assert torch.equal(y, net(x))
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(acts, buffers))


def test_history_logger_rows_and_columns(tmp_path):
    """Lightning hands the logger one epoch's metrics (0-based ``epoch`` added); the CSV keeps every value
    exactly (Python's repr of the float) with columns in order of first appearance."""
    path = tmp_path / "history.csv"
    logger = HistoryLogger(path)
    logger.log_metrics({"lr": 0.1, "train_loss": 1 / 3, "geo-va": 0.1234567891234, "epoch": 0})
    logger.log_metrics({"lr": 0.09, "train_loss": 2 / 3, "geo-va": 0.2, "gtex-te": 0.5, "epoch": 1})
    logger.log_metrics({"seconds": 1.5, "epoch": 1})  # more of the same epoch
    with open(path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["epoch", "lr", "train_loss", "geo-va", "gtex-te", "seconds"]
    assert rows[1] == ["1", "0.1", repr(1 / 3), "0.1234567891234", "", ""]
    assert rows[2] == ["2", "0.09", repr(2 / 3), "0.2", "0.5", "1.5"]
    resumed = HistoryLogger(tmp_path / "other.csv")
    resumed.load_rows(logger.rows)
    resumed.log_metrics({"lr": 0.08, "epoch": 2})
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3]


def test_device_data_batches_are_the_seeded_permutation():
    """The data module's batches are the rows of ``torch.randperm`` from a generator seeded with ``seed``,
    in order; the monitor set is a sorted numpy-chosen subset; the generator state round-trips."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)).astype(np.float32), rng.normal(size=(23, 3)).astype(np.float32)
    splits = {"geo-tr": (x, y), "geo-va": (x[:4], y[:4])}
    dm = DeviceData(splits, eval_splits=["geo-va", "gtex-te"], batch_size=10, eval_batch_size=3, monitor_size=7, seed=5)
    dm.setup("fit")
    assert dm.eval_names == ["monitor_mae", "geo-va"]
    state = dm.state_dict()
    order = torch.randperm(23, generator=torch.Generator().manual_seed(5))
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [10, 10, 3]
    assert np.array_equal(np.concatenate([b[0].numpy() for b in batches]), x[order.numpy()])
    assert np.array_equal(np.concatenate([b[1].numpy() for b in batches]), y[order.numpy()])
    dm.load_state_dict(state)
    again = list(dm.train_dataloader())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    mon = np.sort(np.random.default_rng(5).choice(23, size=7, replace=False))
    val = dm.val_dataloader()
    assert np.array_equal(np.concatenate([c[0].numpy() for c in val[0]]), x[mon])
    assert [len(c[0]) for c in val[1]] == [3, 1]


class _Trainer:
    def __init__(self, opt, mae):
        self.optimizers, self.callback_metrics = [opt], {"monitor_mae": torch.tensor(mae)}


def test_rate_rule_decays_only_when_the_monitored_mae_rose():
    """×0.9 after an epoch whose monitored MAE is higher than the previous epoch's; equal or lower keeps the
    rate; the floor holds; the deeper group keeps 3× the base rate."""
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0, "lr_scale": 1.0}, {"params": [q], "lr": 3.0, "lr_scale": 3.0}])
    rule = PaperLRDecay(1.0, 0.9, 0.75)
    rates = []
    for mae in [0.5, 0.6, 0.6, 0.4, 0.45, 0.5, 0.55]:
        rule.on_train_epoch_end(_Trainer(opt, mae), None)
        rates.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == pytest.approx(3 * rates[-1])
    expected, lr, prev = [], 1.0, None
    for mae in [0.5, 0.6, 0.6, 0.4, 0.45, 0.5, 0.55]:
        if prev is not None and np.float32(mae) > np.float32(prev):
            lr = max(lr * 0.9, 0.75)
        prev = mae
        expected.append(lr)
    assert rates == expected == [1.0, 0.9, 0.9, 0.9, 0.81, 0.75, 0.75]
