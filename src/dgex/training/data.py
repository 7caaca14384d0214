"""The device-backed data module: every split resident on the training device.

Training profiles and their targets sit side by side in one device tensor
``(n, row)`` (``row >= n_in + n_out``, padded so that each row starts aligned);
a mini-batch is ONE ``index_select`` of the rows a seeded permutation picks,
and its inputs and targets are views of that gather.  The permutation comes
from a dedicated CPU generator whose state is part of the checkpoint
(:meth:`DeviceData.state_dict`), so a resumed run draws the same batches.

The evaluation sets -- the fixed subset of training profiles whose error
drives the learning-rate rule, then the evaluation splits -- are the
validation dataloaders, in :attr:`DeviceData.eval_names` order, each yielding
contiguous ``(x, y)`` chunks of ``eval_batch_size`` profiles.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

#: The validation set made of training profiles (the paper's 5,000); its MAE is logged under this name.
MONITOR = "monitor_mae"
#: Row length of the training tensor is rounded up to this many elements (64 bytes in float32).
ROW_ALIGN = 16


class ShuffledBatches:
    """Mini-batches of rows of a device tensor ``xy`` ``(n, row)``, reshuffled every epoch by ``generator``.

    Iterating yields ``(x, y)``: ``x`` ``(batch, n_in)`` and ``y`` ``(batch, n_out)``, views of one
    gather; the last, smaller batch is kept.  The permutation is drawn at the first batch, not at
    ``iter()``, so a checkpoint written between epochs holds the generator state before it.
    """

    def __init__(self, xy: torch.Tensor, n_in: int, n_out: int, batch_size: int, generator: torch.Generator):
        self.xy, self.n_in, self.n_out, self.batch_size, self.generator = xy, n_in, n_out, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(self.xy.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(self.xy.shape[0], generator=self.generator).to(self.xy.device)
        for idx in order.split(self.batch_size):
            rows = self.xy.index_select(0, idx)
            yield rows[:, : self.n_in], rows[:, self.n_in : self.n_in + self.n_out]


class Chunks:
    """``(x, y)`` slices of ``eval_batch_size`` consecutive profiles of one evaluation set, in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, size: int):
        self.x, self.y, self.size = x, y, size

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for s in range(0, self.x.shape[0], self.size):
            yield self.x[s : s + self.size], self.y[s : s + self.size]


def monitor_rows(n_train: int, size: int, seed: int) -> np.ndarray:
    """The sorted indices of the ``min(size, n_train)`` training profiles whose error drives the rate rule."""
    return np.sort(np.random.default_rng(seed).choice(n_train, size=min(size, n_train), replace=False))


class DeviceData(pl.LightningDataModule):
    """The run's data on the training device.

    ``splits``: ``{split: (X (n, n_in), Y (n, n_out))}`` float32 host arrays,
    with ``train_split`` among them; ``eval_splits``: the evaluation splits in
    logging order (those absent from ``splits`` are skipped).
    """

    def __init__(
        self,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        *,
        eval_splits: Sequence[str],
        batch_size: int,
        eval_batch_size: int,
        monitor_size: int,
        seed: int,
        train_split: str = "geo-tr",
    ):
        super().__init__()
        self.splits, self.train_split = splits, train_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        x_tr, y_tr = splits[train_split]
        self.n_train, self.n_in, self.n_out = x_tr.shape[0], x_tr.shape[1], y_tr.shape[1]
        self.monitor_rows = monitor_rows(self.n_train, monitor_size, seed)
        self.eval_names = [MONITOR, *(s for s in eval_splits if s in splits)]
        self.generator = torch.Generator().manual_seed(seed)
        self.train_xy: torch.Tensor | None = None
        self.eval_sets: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def device(self) -> torch.device:
        """The training device: the trainer's root device, or the CPU before a trainer is attached."""
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def setup(self, stage: str) -> None:
        """Copy the splits to the device (once; Lightning calls this for every stage)."""
        if self.train_xy is not None:
            return
        x_tr, y_tr = self.splits[self.train_split]
        self.train_xy = side_by_side(x_tr, y_tr, self.device)
        monitor = torch.as_tensor(self.monitor_rows, device=self.device)
        picked = self.train_xy.index_select(0, monitor)
        self.eval_sets = [
            (picked[:, : self.n_in].contiguous(), picked[:, self.n_in : self.n_in + self.n_out].contiguous())
        ]
        for name in self.eval_names[1:]:
            x, y = self.splits[name]
            self.eval_sets.append((torch.as_tensor(x, device=self.device), torch.as_tensor(y, device=self.device)))
        # the host copy of the training split is not needed any more (on the CPU it would double the memory)
        self.splits = {k: v for k, v in self.splits.items() if k != self.train_split}

    def train_dataloader(self) -> ShuffledBatches:
        """Shuffled mini-batches of the training split, gathered on the device (one gather per batch)."""
        return ShuffledBatches(self.train_xy, self.n_in, self.n_out, self.batch_size, self.generator)

    def val_dataloader(self) -> list[Chunks]:
        """One loader per evaluation set (the training monitor first), in fixed chunks."""
        return [Chunks(x, y, self.eval_batch_size) for x, y in self.eval_sets]

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Return ``batch`` as it is: it is already on the device."""
        return batch  # already on the device: skip Lightning's walk over the batch

    def state_dict(self) -> dict:
        """The state a resumed run needs: the shuffling generator's state."""
        return {"batch_generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the shuffling generator of a resumed run."""
        self.generator.set_state(state_dict["batch_generator"])


def side_by_side(x: np.ndarray, y: np.ndarray, device: torch.device) -> torch.Tensor:
    """``[x | y | padding]``: one ``(n, row)`` float32 tensor on ``device``, ``row`` a multiple of :data:`ROW_ALIGN`."""
    n, n_in = x.shape
    row = -(-(n_in + y.shape[1]) // ROW_ALIGN) * ROW_ALIGN
    xy = torch.zeros((n, row), dtype=torch.float32, device=device)
    xy[:, :n_in] = torch.as_tensor(x)
    xy[:, n_in : n_in + y.shape[1]] = torch.as_tensor(y)
    return xy
