"""The network and the recipe's pieces: dropout placement, initialisation, lr groups, decay, loss, momentum."""

from __future__ import annotations

import math

import pytest
import torch

from dgex.errors import ConfigError
from dgex.models import DGEX
from dgex.train import TrainConfig
from dgex.training.callbacks import decayed_lr
from dgex.training.plan import ClassicalMomentumSGD, batch_loss, default_learning_rate, parameter_groups


def test_shapes_and_parameter_count():
    with torch.device("meta"):  # shapes only, no 850 MB allocation
        net = DGEX(943, 4760, n_layers=3, n_units=9000, dropout=0.1)
    expected = (943 * 9000 + 9000) + 2 * (9000 * 9000 + 9000) + (9000 * 4760 + 4760)
    assert net.n_parameters() == expected  # ~213M per half, ~427M for both (paper)
    small = DGEX(10, 7, n_layers=2, n_units=5)
    assert small(torch.zeros(4, 10)).shape == (4, 7)


def test_initialisation_ranges():
    torch.manual_seed(0)
    net = DGEX(943, 500, n_layers=2, n_units=300)
    b1 = math.sqrt(6 / (943 + 300))
    b2 = math.sqrt(6 / (300 + 300))
    w1, w2, wo = net.hidden[0].weight, net.hidden[1].weight, net.output.weight
    assert w1.abs().max() <= b1 and w1.abs().max() > 0.95 * b1
    assert w2.abs().max() <= b2 and w2.abs().max() > 0.95 * b2
    assert wo.abs().max() <= 1e-4 and wo.abs().max() > 0.9e-4
    assert all(float(layer.bias.detach().abs().max()) == 0 for layer in [*net.hidden, net.output])


def test_dropout_is_never_on_the_landmark_input_but_on_later_layer_inputs():
    torch.manual_seed(0)
    net = DGEX(20, 3, n_layers=1, n_units=50, dropout=0.5)
    net.train()
    x = torch.randn(1, 20)
    h = torch.tanh(net.hidden[0](x))  # deterministic: no dropout on the input
    # with one hidden layer dropout acts only on the output layer's input: outputs vary across calls
    outs = torch.stack([net(x) for _ in range(20)])
    assert outs.std(0).max() > 0
    # and the hidden activations seen through return_hidden are never dropped
    _, acts = net(x, return_hidden=True)
    torch.testing.assert_close(acts[0], h)
    net.eval()
    torch.testing.assert_close(net(x), net.output(h))


def test_dropout_hits_inputs_of_hidden_layers_two_and_three():
    net = DGEX(8, 2, n_layers=3, n_units=16, dropout=0.25)
    seen = []
    net.drop.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    net.train()
    net(torch.randn(5, 8))
    # called before hidden layer 2, hidden layer 3 and the output layer: 3 times, on 16-wide activations
    assert seen == [(5, 16), (5, 16), (5, 16)]


def test_inverted_dropout_keeps_the_expectation():
    net = DGEX(4, 1, n_layers=1, n_units=4000, dropout=0.25)
    net.train()
    h = torch.ones(1, 4000)
    torch.manual_seed(0)
    dropped = torch.stack([net.drop(h) for _ in range(50)])
    values = torch.unique(dropped).tolist()
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75)
    assert abs(float(dropped.mean()) - 1.0) < 0.01


def test_learning_rate_groups_three_times_for_deep_weights():
    net = DGEX(10, 4, n_layers=3, n_units=6)
    base, deep = parameter_groups(net, 3e-4)
    assert base["lr"] == 3e-4 and deep["lr"] == pytest.approx(9e-4)
    deep_ids = {id(p) for p in deep["params"]}
    assert deep_ids == {id(net.hidden[1].weight), id(net.hidden[2].weight), id(net.output.weight)}
    base_ids = {id(p) for p in base["params"]}
    assert id(net.hidden[0].weight) in base_ids and id(net.output.bias) in base_ids
    assert len(base_ids | deep_ids) == len(list(net.parameters()))
    assert default_learning_rate(1) == 5e-4 and default_learning_rate(2) == default_learning_rate(3) == 3e-4


def test_decay_rule_only_when_monitored_error_rises_and_floors():
    assert decayed_lr(3e-4, 0.50, None, 0.9, 1e-5) == 3e-4  # first epoch: nothing to compare
    assert decayed_lr(3e-4, 0.49, 0.50, 0.9, 1e-5) == 3e-4  # improved: keep
    assert decayed_lr(3e-4, 0.50, 0.50, 0.9, 1e-5) == 3e-4  # equal: keep
    assert decayed_lr(3e-4, 0.51, 0.50, 0.9, 1e-5) == pytest.approx(2.7e-4)
    assert decayed_lr(1.05e-5, 0.51, 0.50, 0.9, 1e-5) == 1e-5  # floor


def test_loss_sums_over_genes_and_averages_over_the_batch():
    pred = torch.zeros(4, 3)
    target = torch.ones(4, 3) * 2
    assert float(batch_loss(pred, target)) == pytest.approx(12.0)  # 3 genes x 2^2, mean over 4 samples
    target[0] = 0
    assert float(batch_loss(pred, target)) == pytest.approx(9.0)


def test_classical_momentum_matches_pylearn2_rule():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = ClassicalMomentumSGD([{"params": [w], "lr": 0.1}], lr=0.1, momentum=0.5)
    v, ref = 0.0, 1.0
    for lr in (0.1, 0.1, 0.05):  # the rate changes between steps, as the decay rule does
        opt.param_groups[0]["lr"] = lr
        w.grad = torch.tensor([2.0 * float(w.detach())])  # d/dw of w^2
        g = 2.0 * ref
        v = 0.5 * v - lr * g
        ref = ref + v
        opt.step()
        assert float(w.detach()) == pytest.approx(ref)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(units=0), "--units"),
        (dict(dropout=1.5), "--dropout"),
        (dict(layers=0), "--layers"),
        (dict(precision="fp8"), "--precision"),
    ],
)
def test_invalid_grid_values(kwargs, message):
    base = dict(layers=2, units=10, dropout=0.1, part=0)
    base.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**base)
    TrainConfig(layers=4, units=10, dropout=0.0, part=0)  # 4 layers is allowed
