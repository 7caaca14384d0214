"""Callbacks for the paper's per-epoch pieces, and the resumable checkpoint.

All act at the end of a training epoch, after the validation loop has logged
the epoch's metrics (:meth:`dgex.training.plan.TrainingPlan.on_validation_epoch_end`);
Lightning calls the checkpoint callback after the others, so a checkpoint
holds the state they left.  Each keeps its resumable state in the
checkpoint's ``"dgex"`` section (:data:`SECTION`), which
:func:`dgex.checkpoints.read_checkpoint_state` reads without Lightning:

* :class:`PaperLRDecay` -- ``lr``, ``previous_monitor``;
* :class:`BestWeights` -- ``best``;
* :class:`ResumableCheckpoint` -- ``format``, the run's identity (``config``,
  ``genes``, ``dataset``), ``history`` (the logger's rows) and the global random
  generator states (``torch_rng``, ``cuda_rng``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from ..checkpoints import CHECKPOINT_FORMAT, SECTION, save_weights
from ..io import save_torch
from .data import MONITOR
from .logger import HistoryLogger
from .plan import TrainingDiverged


def _section(checkpoint: dict) -> dict:
    return checkpoint.setdefault(SECTION, {})


def decayed_lr(lr: float, monitor_mae: float, previous_mae: float | None, decay: float, lr_min: float) -> float:
    """The paper's learning-rate rule after one epoch.

    If the monitored training MAE rose (``monitor_mae > previous_mae``), the
    rate becomes ``lr * decay``, but never below ``lr_min``; an equal or lower
    MAE, or no previous epoch, keeps ``lr``.
    """
    if previous_mae is not None and monitor_mae > previous_mae:
        return max(lr * decay, lr_min)
    return lr


class PaperLRDecay(Callback):
    """The paper's learning-rate decay as a callback, applied after every epoch.

    ``lr *= decay`` (floor ``lr_min``) if the MAE logged as ``monitor`` rose
    versus the previous epoch (:func:`decayed_lr`); every optimiser group keeps
    its ``lr_scale`` times the rate.

    This is not ``ReduceLROnPlateau``: a single rise decays, an equal MAE does not.
    """

    def __init__(self, lr: float, decay: float, lr_min: float, monitor: str = MONITOR):
        self.lr, self.decay, self.lr_min, self.monitor = lr, decay, lr_min, monitor
        self.previous_monitor: float | None = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Apply :func:`decayed_lr` to this epoch's monitored MAE and set every optimiser group's rate."""
        monitor = float(trainer.callback_metrics[self.monitor])
        self.lr = decayed_lr(self.lr, monitor, self.previous_monitor, self.decay, self.lr_min)
        self.previous_monitor = monitor
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Record the current rate and the last monitored MAE in the checkpoint."""
        _section(checkpoint).update(lr=self.lr, previous_monitor=self.previous_monitor)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Restore the rate and the last monitored MAE of a resumed run."""
        # the optimiser's group rates come back with Lightning's optimizer state
        state = checkpoint[SECTION]
        self.lr, self.previous_monitor = state["lr"], state["previous_monitor"]


class BestWeights(Callback):
    """The weights of the epoch with the lowest MAE on each selection split, as ``best_<split>.pt``.

    Improvements are kept in memory (on the device) and written just before the
    next resumable checkpoint, which records them (a paper-size network is
    ~1 GB per file and improves most epochs), and when training diverges.  The
    first epoch to reach a lower MAE wins (strict ``<``); a NaN never does.
    ``record``: ``config``, ``genes`` and ``dataset_fingerprint`` for each file.
    """

    def __init__(self, run_dir: Path, selections: Sequence[str], record: dict):
        self.run_dir, self.record = Path(run_dir), record
        self.best = {s: {"mae": math.inf, "epoch": None} for s in selections}
        self._pending: dict[str, tuple[dict, int, dict]] = {}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Keep in memory the weights of the epochs that lower the best MAE of a selection split."""
        metrics = trainer.callback_metrics
        epoch = trainer.current_epoch + 1
        for sel, best in self.best.items():
            mae = float(metrics[sel])
            if mae < best["mae"]:
                best.update(mae=mae, epoch=epoch)
                # the epoch's errors (its wall time is no property of the weights)
                row = {"epoch": epoch, **{k: float(v) for k, v in metrics.items() if k != "seconds"}}
                state = {k: v.detach().clone() for k, v in pl_module.network.state_dict().items()}
                self._pending[sel] = (state, epoch, row)

    def flush(self, network) -> None:
        """Write the improvements kept in memory to ``best_<split>.pt``."""
        shape = [network.n_in, network.n_out, network.n_layers, network.n_units]
        for sel, (state, epoch, row) in self._pending.items():
            save_weights(self.run_dir / f"best_{sel}.pt", state, shape, epoch, row, self.record)
        self._pending.clear()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Write the pending best weights, then record the best MAE and epoch per split in the checkpoint."""
        self.flush(pl_module.network)  # before the checkpoint that records them is written
        _section(checkpoint)["best"] = self.best

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Restore the best MAE and epoch per split of a resumed run."""
        self.best = checkpoint[SECTION]["best"]

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Write the pending best weights when training diverged, so the epochs before it stay usable."""
        if isinstance(exception, TrainingDiverged):  # the best epochs before it stay usable
            self.flush(pl_module.network)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through :func:`dgex.io.save_torch`.

    It writes a temporary file and renames it into place, so a killed writer
    never leaves a truncated ``last.ckpt``, and a full disk is a one-line error.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        """Write ``checkpoint`` to ``path`` atomically (``storage_options`` are not supported)."""
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_torch(checkpoint, path)


class ResumableCheckpoint(ModelCheckpoint):
    """``last.ckpt`` in ``run_dir``: everything ``--resume`` needs to continue bit-identically.

    Lightning's ``ModelCheckpoint(save_last=True, train_time_interval=...)``,
    except that it saves only at the END of an epoch: its own time trigger
    checks the clock after every batch, and a run cannot be resumed from the
    middle of an epoch of the device-backed batches bit-identically.  A save
    happens at the end of the first epoch that finishes ``interval``
    seconds or more after the previous save (or the start), and always at the
    end of the last epoch.  ``record``: the run's identity (``config`` --
    what must match to continue --, ``genes``, ``dataset`` fingerprint);
    ``history``: the logger whose rows the checkpoint carries.
    """

    def __init__(self, run_dir: Path, interval: float, record: dict, history: HistoryLogger):
        super().__init__(
            dirpath=str(run_dir),
            save_last=True,
            save_top_k=0,
            train_time_interval=timedelta(seconds=interval),
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self.interval, self.record, self.history = interval, record, history

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint: its class name alone."""
        return type(self).__name__  # not the trigger settings: --checkpoint-interval may change on resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Do nothing: Lightning's per-batch time trigger is replaced by the epoch-end save."""
        pass  # never mid-epoch (see the class docstring)

    def on_validation_end(self, trainer, pl_module) -> None:
        """Do nothing: the save happens at the end of the training epoch instead."""
        pass  # saved at the end of the training epoch, after the other callbacks

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        """Save ``last.ckpt`` at the end of the last epoch, or when ``interval`` seconds have passed since the previous save."""
        final = trainer.current_epoch + 1 >= trainer.max_epochs
        if final or time.monotonic() - self._last_time_checked >= self.interval:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_time_checked = time.monotonic()

    def on_train_end(self, trainer, pl_module) -> None:
        """Do nothing: the last epoch was saved by :meth:`on_train_epoch_end`."""
        pass  # the last epoch saved already; a resumed finished run has nothing new

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Add the run's identity, the history rows and the random-number states to the checkpoint."""
        _section(checkpoint).update(
            format=CHECKPOINT_FORMAT,
            **self.record,
            history=self.history.rows,
            torch_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        )

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Restore the history rows and the random-number states of a resumed run."""
        # train() checked the section with resume_problem() before handing the file to Lightning
        state = checkpoint[SECTION]
        self.history.load_rows(state["history"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
