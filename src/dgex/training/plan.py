"""The training plan: how one D-GEX network learns (the paper's recipe, README "Training") and what is measured after every epoch.

* loss: squared error summed over output genes, averaged over the batch;
* optimiser: plain SGD with classical momentum (``v <- mu v - lr g; w <- w + v``,
  as in Pylearn2), base rate 5e-4 (one hidden layer) or 3e-4 (deeper), 3x for
  the weights of hidden layers 2.. and of the output layer;
* after every epoch (the validation loop): the MAE of every evaluation set,
  each over all its profiles and genes at once, logged with the rate used, the
  mean training loss and the epoch's wall time.

The learning-rate rule and the choice of the best epochs are callbacks
(:mod:`dgex.training.callbacks`); the data come from
:class:`dgex.training.data.DeviceData`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytorch_lightning as pl
import torch

from ..errors import DgexError
from ..models import DGEX

#: Hidden layers 2.. and the output layer's weights learn this many times faster.
DEEP_LR_MULTIPLIER = 3.0
OPTIMIZERS = ("sgd", "adamw")


class TrainingDiverged(DgexError):
    """The loss became NaN or infinite."""


def default_learning_rate(n_layers: int) -> float:
    """The paper's base learning rate: 5e-4 for one hidden layer, 3e-4 for deeper networks."""
    return 5e-4 if n_layers == 1 else 3e-4


def batch_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output genes, averaged over the batch (the paper's eq. 3).

    ``pred`` and ``target`` are ``(batch, n_out)``.
    """
    return (pred.float() - target.float()).pow(2).sum(dim=1).mean()


def parameter_groups(network: DGEX, base_lr: float) -> list[dict]:
    """Optimiser groups of ``network``: the deeper weights at 3x the base rate.

    ``base`` (layer 1's weights, every bias) at ``base_lr`` and
    ``deep_weights`` (weights of hidden layers 2.. and of the output) at 3x.

    Each group carries ``lr_scale``, its rate relative to the base rate, so a rate rule keeps the ratio.
    """
    deep_weights = [layer.weight for layer in network.hidden[1:]] + [network.output.weight]
    deep_ids = {id(p) for p in deep_weights}
    base = [p for p in network.parameters() if id(p) not in deep_ids]
    return [
        {"params": base, "lr": base_lr, "lr_scale": 1.0, "name": "base"},
        {
            "params": deep_weights,
            "lr": base_lr * DEEP_LR_MULTIPLIER,
            "lr_scale": DEEP_LR_MULTIPLIER,
            "name": "deep_weights",
        },
    ]


class ClassicalMomentumSGD(torch.optim.Optimizer):
    """Pylearn2's momentum rule: ``v <- mu v - lr g``; ``w <- w + v``.

    Unlike ``torch.optim.SGD`` (``v <- mu v + g; w <- w - lr v``), the learning
    rate sits inside the velocity, which differs once the rate decays.
    """

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter with a gradient by the classical momentum rule; returns the closure's loss, if any."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                bufs.append(state["velocity"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads, alpha=-group["lr"])
            torch._foreach_add_(params, bufs)
        return loss


@dataclass
class _EpochTotals:
    """The epoch's batch-size-weighted loss sum and profile count.

    Kept outside the ``LightningModule``: ``nn.Module.__setattr__`` would cost tens of microseconds
    per batch for two counters.
    """

    loss_sum: torch.Tensor | None = None
    n_seen: int = 0

    def add(self, loss: torch.Tensor, n: int) -> None:
        """Add one batch: its mean ``loss`` (a scalar tensor) over ``n`` profiles."""
        self.loss_sum += loss * n
        self.n_seen += n


class TrainingPlan(pl.LightningModule):
    """Trains ``network`` with the paper's recipe; logs one row of metrics per epoch.

    ``eval_names``: the metric name of each validation dataloader, in order
    (:attr:`dgex.training.data.DeviceData.eval_names`).  The optimiser step is
    taken by hand (manual optimisation: zero the gradients, backward, step),
    which is what Lightning's automatic optimisation does for this plan, minus
    its per-step closure machinery.
    """

    def __init__(
        self,
        network: DGEX,
        *,
        lr: float,
        momentum: float = 0.5,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        eval_names: Sequence[str] = (),
    ):
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.network = network
        self.base_lr, self.momentum, self.optimizer_name, self.weight_decay = lr, momentum, optimizer, weight_decay
        self.eval_names = list(eval_names)
        self.automatic_optimization = False
        self._epoch = _EpochTotals()
        self._epoch_start = 0.0
        self._errors: list[list[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The network's predictions for landmarks ``x`` ``(batch, n_in)``: ``(batch, n_out)``."""
        return self.network(x)

    # -- optimisation
    def configure_optimizers(self):
        """Classical-momentum SGD (or AdamW) over :func:`parameter_groups`: deeper weights at 3x the base rate."""
        groups = parameter_groups(self.network, self.base_lr)
        if self.optimizer_name == "adamw":
            for g in groups:
                g.pop("name", None)
            return torch.optim.AdamW(groups, lr=self.base_lr, weight_decay=self.weight_decay)
        return ClassicalMomentumSGD(groups, lr=self.base_lr, momentum=self.momentum)

    def on_train_epoch_start(self) -> None:
        """Reset the epoch's running training loss, profile count and wall clock."""
        self._epoch = _EpochTotals(torch.zeros((), device=self.device))
        self._epoch_start = time.time()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """One optimisation step on a batch ``(x, y)``; adds to the epoch's running loss and returns the batch loss."""
        x, y = batch
        optimizer = self.optimizers()
        loss = batch_loss(self.network(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self._epoch.add(loss.detach(), x.shape[0])
        return loss

    # -- the per-epoch evaluation
    def on_validation_epoch_start(self) -> None:
        """Start one list of absolute errors per evaluation set."""
        self._errors = [[] for _ in self.eval_names]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        """Keep the absolute errors ``(batch, n_out)`` of a chunk of evaluation set ``dataloader_idx``."""
        x, y = batch
        self._errors[dataloader_idx].append((self.network(x).float() - y).abs())

    def on_validation_epoch_end(self) -> None:
        """Log the epoch's row: rate, mean training loss, the MAE of every evaluation set, wall time.

        Logged here rather than at the end of the training epoch so that the
        logger holds the whole row before the epoch-end callbacks (the rate
        rule, the best weights, the checkpoint) run.
        """
        if self.trainer.sanity_checking:
            return
        train_loss = float(self._epoch.loss_sum) / self._epoch.n_seen
        rate = self.trainer.optimizers[0].param_groups[0]["lr"]  # the base group's rate during this epoch
        if not math.isfinite(train_loss):
            raise TrainingDiverged(
                f"training diverged at epoch {self.current_epoch + 1}: loss is {train_loss} at learning rate "
                f"{rate:.3g}; lower --lr"
            )
        self.log("lr", _exact(rate))
        self.log("train_loss", _exact(train_loss))
        for name, errors in zip(self.eval_names, self._errors):
            # one mean over all profiles and genes, as float32 (as the errors were always computed)
            self.log(name, torch.cat(errors).mean())
        self._errors = []
        self.log("seconds", _exact(time.time() - self._epoch_start))


def _exact(value: float) -> torch.Tensor:
    """``value`` as a float64 tensor: ``self.log`` would round a Python float to float32."""
    return torch.tensor(value, dtype=torch.float64)
