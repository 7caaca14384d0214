"""The D-GEX network as a plain ``nn.Module`` (how it is trained: :mod:`dgex.training.plan`).

Architecture (from the authors' code, GitHub uci-cbcl/D-GEX; README "Training"): landmark input -> 1..n fully
connected tanh hidden layers of equal width -> linear output (one target part).
Dropout is applied to the *inputs* of hidden layers 2..n and of the output
layer, never to the landmark input.  Hidden weights are drawn from
U[+-sqrt(6 / (fan_in + fan_out))] (Glorot), output weights from U[+-1e-4],
biases are zero.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Output-layer weights are initialised in U[-OUTPUT_INIT, OUTPUT_INIT].
OUTPUT_INIT = 1e-4


class DGEX(nn.Module):
    """Multi-task feed-forward regressor ``(batch, n_in) -> (batch, n_out)``."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, n_units: int, dropout: float = 0.0):
        super().__init__()
        if n_layers < 1 or n_units < 1 or n_in < 1 or n_out < 1:
            raise ValueError(f"invalid network shape: {n_in} -> {n_layers} x {n_units} -> {n_out}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_in, self.n_out, self.n_layers, self.n_units, self.dropout_rate = n_in, n_out, n_layers, n_units, dropout
        widths = [n_in] + [n_units] * n_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.output = nn.Linear(n_units, n_out)
        self.drop = nn.Dropout(dropout)  # inverted dropout: scales kept units by 1/(1-p) in training
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights and zero biases, as the paper's networks were initialised."""
        with torch.no_grad():
            for layer in self.hidden:
                bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
                layer.weight.uniform_(-bound, bound)
                layer.bias.zero_()
            self.output.weight.uniform_(-OUTPUT_INIT, OUTPUT_INIT)
            self.output.bias.zero_()

    def forward(self, x: torch.Tensor, return_hidden: bool = False, buffers: list[torch.Tensor] | None = None):
        """Predictions ``(batch, n_out)`` from landmarks ``x`` ``(batch, n_in)``.

        ``return_hidden``: also return each hidden layer's activations ``(batch, n_units)``.
        ``buffers``: one preallocated ``(batch, n_units)`` tensor per hidden layer that receives its
        activations (inference only: ``out=`` does not record gradients); inference reuses them
        because fresh allocations page-fault on every batch.
        """
        acts = []
        h = x
        for k, layer in enumerate(self.hidden):
            if k:  # no dropout on the landmark input
                h = self.drop(h)
            if buffers is None:
                h = torch.tanh(layer(h))
            else:
                h = torch.addmm(layer.bias, h, layer.weight.t(), out=buffers[k]).tanh_()
            acts.append(h)
        y = self.output(self.drop(h))
        return (y, acts) if return_hidden else y

    def n_parameters(self) -> int:
        """Number of trainable and fixed parameters of the network."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> int:
        """Multiply-adds x 2 of one forward pass; training (fwd + bwd) is ~3x this."""
        widths = [self.n_in] + [self.n_units] * self.n_layers + [self.n_out]
        return 2 * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
