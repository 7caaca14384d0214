"""Stage ``train``: one D-GEX network (one grid point x one target part) with Lightning.

The recipe (RECIPE.md) in one place:

* mini-batches of 200, plain SGD with classical momentum 0.5
  (``v <- 0.5 v - lr * grad; w <- w + v``, as in Pylearn2);
* base learning rate 5e-4 (one hidden layer) or 3e-4 (deeper), 3x for the
  weights of hidden layers 2.. and the output layer (:meth:`DGEX.param_groups`);
* loss = squared error summed over output genes, averaged over the batch;
* after every epoch: MAE on a fixed subset of 5,000 training profiles (eval
  mode); if it rose versus the previous epoch the learning rate is multiplied
  by 0.9, never below 1e-5 (this is not ``ReduceLROnPlateau``);
* after every epoch: MAE on GEO-va, GEO-te, 1000G-va, GTEx-te; the best epoch
  by GEO-va and the best by 1000G-va are each kept as a checkpoint.

Data live on the training device as tensors and are sliced by a shuffled
index per batch (no DataLoader workers in the hot loop).  A Lightning
checkpoint ``last.ckpt`` written after every epoch, including every random
generator state, makes ``--resume`` continue bit-identically after a crash.
The checkpoint records the dataset's content fingerprint and the
hyper-parameters; a checkpoint that cannot be continued (unreadable, another
dataset or other settings, more epochs done than asked for) is an error, or
with ``restart_incompatible`` (what the workflow passes) a logged restart from
scratch -- never a run that mixes two datasets or two recipes.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .dataset import EVAL_SPLITS, SELECTIONS, ProcessedDataset, fingerprint_differences
from .devices import lease_gpu, pick_device
from .errors import ConfigError, DgexError, InputError
from .io import atomic_path, refuse_overwriting_inputs, save_torch, sweep_stale, write_json
from .metrics import per_gene_frame, write_per_gene
from .models import DGEX, default_learning_rate
from .runs import lock_run_dir

log = logging.getLogger(__name__)

PRECISIONS = ("32", "tf32", "bf16-mixed")
OPTIMIZERS = ("sgd", "adamw")


class TrainingDiverged(DgexError):
    """The loss became NaN or infinite."""


class CannotResume(DgexError):
    """``--resume`` found a checkpoint that must not be continued."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


@dataclass
class TrainConfig:
    """Hyper-parameters of one run; defaults are the paper's."""

    layers: int
    units: int
    dropout: float
    part: int | None  # target part (half); None = all targets jointly
    epochs: int = 200
    batch_size: int = 200
    lr: float | None = None  # None: 5e-4 for 1 layer, 3e-4 otherwise
    momentum: float = 0.5
    lr_decay: float = 0.9
    lr_min: float = 1e-5
    monitor_size: int = 5000
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    precision: str = "32"
    seed: int = 0
    eval_batch_size: int = 8192
    checkpoint_interval: float = 60.0  # seconds between resumable checkpoints

    def __post_init__(self):
        problems = []
        if self.layers < 1:
            problems.append(f"--layers must be >= 1 (got {self.layers})")
        if self.units < 1:
            problems.append(f"--units must be >= 1 (got {self.units})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.part is not None and self.part < 0:
            problems.append(f"--part must be >= 0 or 'all' (got {self.part})")
        if self.epochs < 1 or self.batch_size < 1 or self.monitor_size < 1:
            problems.append("--epochs, --batch-size and --monitor-size must be >= 1")
        if self.lr is not None and not 0 < self.lr < math.inf:
            problems.append(f"--lr must be a finite number > 0 (got {self.lr})")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"--momentum must be in [0, 1) (got {self.momentum})")
        if not 0.0 < self.lr_decay <= 1.0:
            problems.append(f"--lr-decay must be in (0, 1] (got {self.lr_decay})")
        if not 0 < self.lr_min < math.inf:
            problems.append(f"--lr-min must be a finite number > 0 (got {self.lr_min})")
        if not 0 <= self.weight_decay < math.inf:
            problems.append(f"--weight-decay must be a finite number >= 0 (got {self.weight_decay})")
        if not 0 <= self.checkpoint_interval < math.inf:
            problems.append(
                f"--checkpoint-interval must be a finite number of seconds >= 0 (got {self.checkpoint_interval})"
            )
        if not 0 <= self.seed < 2**32:
            problems.append(f"--seed must be an integer in 0..{2**32 - 1} (got {self.seed})")
        if self.precision not in PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer})")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def base_lr(self) -> float:
        return self.lr if self.lr is not None else default_learning_rate(self.layers)

    def resume_key(self) -> dict:
        """Everything that must match for ``--resume`` to continue the same run (``epochs`` may grow)."""
        d = asdict(self)
        d.pop("epochs")
        d.pop("eval_batch_size")
        d.pop("checkpoint_interval")
        return d


# --------------------------------------------------------------------------- #
# optimizer and learning-rate rule
# --------------------------------------------------------------------------- #
class ClassicalMomentumSGD(torch.optim.Optimizer):
    """Pylearn2's momentum rule: ``v <- mu v - lr g``; ``w <- w + v``.

    Unlike ``torch.optim.SGD`` (``v <- mu v + g; w <- w - lr v``), the learning
    rate sits inside the velocity, which differs once the rate decays.
    """

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
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


def decayed_lr(lr: float, monitor_mae: float, previous_mae: float | None, decay: float, lr_min: float) -> float:
    """The paper's rule: if the monitored training MAE rose, ``lr *= decay`` (floor ``lr_min``)."""
    if previous_mae is not None and monitor_mae > previous_mae:
        return max(lr * decay, lr_min)
    return lr


def batch_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output genes, averaged over the batch (the paper's eq. 3)."""
    return (pred.float() - target.float()).pow(2).sum(dim=1).mean()


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
class ShuffledBatches:
    """Mini-batches of device tensors, reshuffled each epoch by a seeded generator.

    Iterating yields ``(x, y)`` with ``x`` ``(batch, n_in)`` and ``y`` ``(batch, n_out)``;
    the last, smaller batch is kept.  The generator state is checkpointed.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.x.shape[0], generator=self.generator).to(self.x.device)
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            yield self.x.index_select(0, idx), self.y.index_select(0, idx)


def load_training_data(dataset: ProcessedDataset, part: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (X, Y)}`` for every split in the dataset; ``Y`` restricted to target ``part``."""
    if part is not None and part >= dataset.genes().n_parts:
        raise ConfigError(
            f"--part {part} does not exist: the dataset has target parts 0..{dataset.genes().n_parts - 1}"
        )
    return {s: (dataset.X(s), dataset.Y(s, part)) for s in dataset.splits}


# --------------------------------------------------------------------------- #
# the Lightning module
# --------------------------------------------------------------------------- #
def _lightning():
    import warnings

    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    import pytorch_lightning as pl

    # Lightning's INFO banners (GPU/TPU available, tips) are noise in per-run logs
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)

    return pl


def build_task(cfg: TrainConfig, data: dict, device: torch.device, run_dir: Path, gene_ids: dict, fingerprint: dict):
    """The LightningModule for one run (built lazily so importing dgex.train stays light)."""
    pl = _lightning()

    class DGEXTask(pl.LightningModule):
        """Trains :class:`DGEX` with the paper's recipe and tracks the best epochs."""

        def __init__(self):
            super().__init__()
            x_tr, y_tr = data["geo-tr"]
            self.cfg = cfg
            self.model = DGEX(x_tr.shape[1], y_tr.shape[1], cfg.layers, cfg.units, cfg.dropout)
            self.automatic_optimization = True
            self.lr = cfg.base_lr
            self.previous_monitor: float | None = None
            self.best = {s: {"mae": math.inf, "epoch": None} for s in SELECTIONS if s in data}
            self.history: list[dict] = []
            self._epoch_loss = None
            self._epoch_start = None
            self._tensors = {
                s: (torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)) for s, (x, y) in data.items()
            }
            gen = np.random.default_rng(cfg.seed)
            n_tr = x_tr.shape[0]
            self._monitor_idx = torch.as_tensor(
                np.sort(gen.choice(n_tr, size=min(cfg.monitor_size, n_tr), replace=False)), device=device
            )
            self.batches = ShuffledBatches(*self._tensors["geo-tr"], cfg.batch_size, cfg.seed)
            self._best_state: dict = {}
            self._last_save = time.time()

        # -- optimisation
        def configure_optimizers(self):
            groups = self.model.param_groups(self.lr)
            if cfg.optimizer == "adamw":
                for g in groups:
                    g.pop("name", None)
                return torch.optim.AdamW(groups, lr=self.lr, weight_decay=cfg.weight_decay)
            return ClassicalMomentumSGD(groups, lr=self.lr, momentum=cfg.momentum)

        def train_dataloader(self):
            return self.batches

        def on_train_epoch_start(self):
            self._epoch_loss = torch.zeros((), device=device)
            self._epoch_start = time.time()

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = batch_loss(self.model(x), y)
            self._epoch_loss += loss.detach() * x.shape[0]
            return loss

        # -- evaluation
        @torch.no_grad()
        def predict_split(self, split: str) -> torch.Tensor:
            x, _ = self._tensors[split]
            return self._predict(x)

        @torch.no_grad()
        def _predict(self, x: torch.Tensor) -> torch.Tensor:
            was_training = self.model.training
            self.model.eval()
            out = torch.cat(
                [self.model(x[s : s + cfg.eval_batch_size]).float() for s in range(0, x.shape[0], cfg.eval_batch_size)]
            )
            self.model.train(was_training)
            return out

        def _mae(self, x, y) -> float:
            return float((self._predict(x) - y).abs().mean())

        def on_train_epoch_end(self):
            epoch = self.current_epoch
            n_tr = self._tensors["geo-tr"][0].shape[0]
            train_loss = float(self._epoch_loss) / n_tr
            if not math.isfinite(train_loss):
                self.flush_best()
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}: loss is {train_loss} at learning rate {self.lr:.3g}; "
                    f"lower --lr (the best checkpoints so far are kept in {run_dir})"
                )
            x_tr, y_tr = self._tensors["geo-tr"]
            monitor = self._mae(x_tr.index_select(0, self._monitor_idx), y_tr.index_select(0, self._monitor_idx))
            row = {"epoch": epoch + 1, "lr": self.lr, "train_loss": train_loss, "monitor_mae": monitor}
            for split in EVAL_SPLITS:
                if split in self._tensors:
                    row[split] = self._mae(*self._tensors[split])
            for sel, best in self.best.items():
                if row[sel] < best["mae"]:
                    best.update(mae=row[sel], epoch=epoch + 1)
                    # kept on the device; written with the next checkpoint (large nets improve every epoch)
                    self._best_state[sel] = (
                        {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                        epoch + 1,
                        dict(row),
                    )
            # the paper's decay rule, applied for the next epoch
            self.lr = decayed_lr(self.lr, monitor, self.previous_monitor, cfg.lr_decay, cfg.lr_min)
            self.previous_monitor = monitor
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] = self.lr * group.get("lr_scale", 1.0)
            row["seconds"] = time.time() - self._epoch_start
            self.history.append(row)
            _write_history(run_dir / "history.csv", self.history)
            # the resumable state, after everything above was updated; at most every
            # checkpoint_interval seconds because a paper-size checkpoint is gigabytes
            final = epoch + 1 >= self.trainer.max_epochs
            if final or time.time() - self._last_save >= cfg.checkpoint_interval:
                self.flush_best()
                with atomic_path(run_dir / "last.ckpt") as tmp:
                    self.trainer.save_checkpoint(tmp)
                self._last_save = time.time()

        def flush_best(self):
            """Write the best-so-far weights kept in memory to best_<selection>.pt."""
            for sel, (state, epoch, row) in self._best_state.items():
                _save_weights(run_dir / f"best_{sel}.pt", state, self.model, cfg, epoch, row, gene_ids, fingerprint)
            self._best_state.clear()

        # -- resumable state beyond Lightning's own
        def on_save_checkpoint(self, checkpoint):
            checkpoint["dgex"] = {
                "config": cfg.resume_key(),
                "genes": gene_ids,
                "dataset": fingerprint,
                "lr": self.lr,
                "previous_monitor": self.previous_monitor,
                "best": self.best,
                "history": self.history,
                "batch_generator": self.batches.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            }

        def on_load_checkpoint(self, checkpoint):
            # train() checked it with resume_problem() before handing it to Lightning
            state = checkpoint["dgex"]
            self.lr = state["lr"]
            self.previous_monitor = state["previous_monitor"]
            self.best = state["best"]
            self.history = state["history"]
            self.batches.generator.set_state(state["batch_generator"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])

    return DGEXTask()


def _save_weights(
    path: Path, state: dict, model: DGEX, cfg: TrainConfig, epoch: int, row: dict, gene_ids: dict, fingerprint: dict
) -> None:
    save_torch(
        {
            "state_dict": {k: v.cpu() for k, v in state.items()},
            "config": asdict(cfg),
            "epoch": epoch,
            "metrics": dict(row),
            "genes": gene_ids,
            "dataset_fingerprint": fingerprint["sha256"],
            "shape": [model.n_in, model.n_out, model.n_layers, model.n_units],
            "dgex_version": __version__,
        },
        path,
    )


#: A best validation MAE this many times that of predicting the training mean means training failed.
TRIVIAL_FACTOR = 10.0


def worse_than_trivial(best_mae: float, y_tr: np.ndarray, y_va: np.ndarray, lr: float) -> str | None:
    """Why a run's best geo-va MAE shows a failed training (far worse than the trivial predictor), or None.

    The trivial predictor answers every profile with the training mean of each gene; ``y_tr`` and
    ``y_va`` are ``(n_samples, n_targets)``.  A loss can stay finite while the weights run away
    (a learning rate far too high): the result is then a real but meaningless measurement.
    """
    trivial = float(np.abs(y_va - y_tr.mean(axis=0, dtype=np.float64)).mean())
    if not math.isfinite(best_mae) or best_mae > TRIVIAL_FACTOR * max(trivial, 1e-12):
        return (
            f"training diverged: the best geo-va MAE {best_mae:.4g} is more than {TRIVIAL_FACTOR:g} times that of "
            f"predicting the training mean ({trivial:.4g}), so the model is worse than the trivial predictor; "
            f"lower --lr (now {lr:.3g}) and retrain"
        )
    return None


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def load_weights(
    path: str | Path, n_in: int | None = None, n_out: int | None = None, gene_ids: dict | None = None
) -> tuple[DGEX, dict]:
    """Rebuild a network from a ``best_*.pt`` file.

    Checks that it fits ``n_in`` landmarks / ``n_out`` targets and, given
    ``gene_ids`` (``{"landmarks": [...], "targets": [...]}``, Ensembl ids in
    column order), that the checkpoint was trained on exactly those genes.
    """
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise InputError(f"{path}: checkpoint not found; retrain the run") from None
    except Exception as exc:  # unpickling damaged bytes can raise almost any type
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise InputError(
            f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {reason}); retrain the run"
        ) from None
    shape = blob.get("shape") if isinstance(blob, dict) else None
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 4
        or not all(isinstance(v, int) and v >= 1 for v in shape)
        or not isinstance(blob.get("state_dict"), dict)
        or not isinstance(blob.get("config"), dict)
        or not isinstance(blob["config"].get("dropout"), (int, float))
    ):
        raise InputError(f"{path}: not a dgex weights file (best_*.pt written by `dgex train`); retrain the run")
    shape_in, shape_out, layers, units = shape
    if (n_in is not None and n_in != shape_in) or (n_out is not None and n_out != shape_out):
        raise InputError(
            f"{path}: network maps {shape_in} -> {shape_out} genes but the dataset has {n_in} landmarks -> "
            f"{n_out} targets; use the dataset the model was trained on"
        )
    if gene_ids is not None and "genes" in blob:
        for role in ("landmarks", "targets"):
            want, have = list(gene_ids[role]), list(blob["genes"][role])
            if want != have:
                diff = sorted(set(want) ^ set(have))
                what = (
                    f"{len(diff)} genes differ, e.g. {', '.join(diff[:5])}"
                    if diff
                    else "same genes in a different order"
                )
                raise InputError(
                    f"{path}: {role} of the checkpoint do not match the dataset ({what}); "
                    f"use the dataset the model was trained on"
                )
    model = DGEX(shape_in, shape_out, layers, units, blob["config"]["dropout"])
    try:
        model.load_state_dict(blob["state_dict"])
    except (RuntimeError, TypeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise InputError(f"{path}: weights do not fit the network they describe ({reason}); retrain the run") from None
    model.eval()
    return model, blob


# --------------------------------------------------------------------------- #
# resuming
# --------------------------------------------------------------------------- #
#: Files of a run folder; starting from scratch removes them all.
RUN_FILES = ("last.ckpt", *(f"best_{s}.pt" for s in SELECTIONS), "history.csv", "per_gene.csv", "run.json")


def remove_dead_temps(run_dir: Path) -> list[Path]:
    """Delete the temporary files that killed writers left for the run files of ``run_dir``."""
    return [p for name in RUN_FILES for p in sweep_stale(run_dir / name)]


def _load_checkpoint(path: Path):
    """``torch.load`` memory-mapped (reads the pickle, not the tensors); unmapped if the file system refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise
    except Exception:  # unpickling damaged bytes can raise almost any type
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint_state(path: Path) -> dict:
    """The dgex part of a Lightning checkpoint, or :class:`CannotResume` if it is unreadable.

    Memory-mapped: only the small pickled state is read, not the weights.
    """
    fix = "delete it to train from scratch"
    try:
        ckpt = _load_checkpoint(path)
    except Exception as exc:  # unpickling damaged bytes can raise almost any type
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise CannotResume(f"{path} is truncated or corrupt ({type(exc).__name__}: {reason})", fix) from None
    state = ckpt.get("dgex") if isinstance(ckpt, dict) else None
    if (
        not isinstance(state, dict)
        or not {"config", "genes", "lr", "history", "best"} <= set(state)
        or not isinstance(state["config"], dict)
        or not isinstance(state["history"], list)
    ):
        raise CannotResume(f"{path} is not a dgex training checkpoint", fix)
    return state


def resume_problem(
    state: dict, cfg: TrainConfig, gene_ids: dict, fingerprint: dict, dataset, run_dir: Path
) -> CannotResume | None:
    """Why the checkpoint ``state`` of ``run_dir`` must not be continued with these settings and data, or None."""
    fresh = "delete the run folder to train from scratch"
    key = cfg.resume_key()
    if state["config"] != key:
        diff = ", ".join(f"{k}: {state['config'].get(k)} -> {v}" for k, v in key.items() if state["config"].get(k) != v)
        return CannotResume(
            f"hyper-parameters differ from the checkpoint ({diff})", f"use the same settings or {fresh}"
        )
    if state["genes"] != gene_ids:
        return CannotResume(
            f"the checkpoint was trained on other landmark/target genes than {dataset}",
            f"use the original dataset or {fresh}",
        )
    recorded = state.get("dataset")
    if not isinstance(recorded, dict):
        return CannotResume("the checkpoint records no dataset fingerprint (written by an older dgex)", fresh)
    if recorded.get("sha256") != fingerprint["sha256"]:
        what = ", ".join(fingerprint_differences(recorded, fingerprint))
        return CannotResume(
            f"the checkpoint was trained on another dataset than {dataset} ({what})",
            f"use the dataset it was trained on or {fresh}",
        )
    done = len(state["history"])
    if done > cfg.epochs:
        return CannotResume(
            f"the checkpoint has {done} epochs done, more than --epochs {cfg.epochs}",
            f"pass --epochs {done} or more to continue it, or {fresh} with {cfg.epochs} epochs",
        )
    # the best weights so far are part of the state (written just before it); memory-mapped: cheap
    for sel, best in state["best"].items():
        path = run_dir / f"best_{sel}.pt"
        if best.get("epoch") is None:
            continue
        if not path.exists():
            return CannotResume(f"{path}, the best weights so far, is missing", fresh)
        try:
            _load_checkpoint(path)
        except Exception as exc:  # unpickling damaged bytes can raise almost any type
            return CannotResume(f"{path} is truncated or corrupt ({type(exc).__name__})", fresh)
    return None


def _clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- #
# the stage
# --------------------------------------------------------------------------- #
def train(
    *,
    dataset,
    output_dir,
    layers,
    units,
    dropout,
    part,
    epochs=200,
    batch_size=200,
    lr=None,
    momentum=0.5,
    lr_decay=0.9,
    lr_min=1e-5,
    monitor_size=5000,
    optimizer="sgd",
    weight_decay=0.0,
    precision="32",
    seed=0,
    device="auto",
    resume=False,
    restart_incompatible=False,
    keep_last=False,
    progress=True,
    threads=None,
    checkpoint_interval=60.0,
    gpu_lock_dir=None,
) -> dict:
    """Train one network and write its checkpoints, per-gene metrics, history and ``run.json``.

    ``resume``: continue from ``output_dir/last.ckpt`` if present; a checkpoint
    that must not be continued (see :func:`resume_problem`) raises
    :class:`CannotResume`, or with ``restart_incompatible`` is logged and the
    run starts from scratch.  Without ``resume`` the run always starts from scratch.
    """
    cfg = TrainConfig(
        layers=layers,
        units=units,
        dropout=dropout,
        part=part,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        lr_decay=lr_decay,
        lr_min=lr_min,
        monitor_size=monitor_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        precision=precision,
        seed=seed,
        checkpoint_interval=checkpoint_interval,
    )
    if restart_incompatible and not resume:
        raise ConfigError("--restart-incompatible only applies together with --resume")
    run_dir = Path(output_dir)
    last = run_dir / "last.ckpt"
    refuse_overwriting_inputs([run_dir / name for name in RUN_FILES], {"--dataset": dataset}, "--output-dir")
    run_lock = lock_run_dir(run_dir)  # before anything in the folder is removed; None: no folder yet
    lease = None
    try:
        remove_dead_temps(run_dir)
        if threads:
            torch.set_num_threads(int(threads))
        if device in ("auto", "cuda"):  # a specific cuda:N was chosen by the user: no lease
            # sets CUDA_VISIBLE_DEVICES before CUDA starts and logs the GPU (or SLURM's); held until train returns
            lease = lease_gpu(gpu_lock_dir)
        dev = pick_device(device)
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        else:
            torch.set_float32_matmul_precision("highest")

        with ProcessedDataset(dataset) as ds:
            if not ds.has("geo-tr") or not ds.has("geo-va"):
                raise InputError(f"{dataset}: needs geo-tr and geo-va splits; rerun `dgex preprocess`")
            data = load_training_data(ds, part)
            genes = ds.genes()
            fingerprint = ds.fingerprint()
        targets = genes.targets if part is None else genes.targets[genes.targets["part"] == part].reset_index(drop=True)
        gene_ids = {"landmarks": genes.landmarks["ensembl"].tolist(), "targets": targets["ensembl"].tolist()}

        continue_from = None
        if resume and last.exists():
            try:
                problem = resume_problem(read_checkpoint_state(last), cfg, gene_ids, fingerprint, dataset, run_dir)
            except CannotResume as exc:
                problem = exc
            if problem is None:
                continue_from = last
            elif restart_incompatible:
                log.warning("cannot resume %s: %s; training from scratch", run_dir, problem.problem)
            else:
                raise CannotResume(
                    f"cannot resume {run_dir}: {problem.problem}", f"{problem.fix} (or pass --restart-incompatible)"
                )
        elif resume:
            log.info("no checkpoint in %s: starting from scratch", run_dir)
        if continue_from is None:  # nothing of an earlier run may survive into this one
            _clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_lock is None:
            run_lock = lock_run_dir(run_dir)

        pl = _lightning()
        pl.seed_everything(seed, workers=True, verbose=False)
        task = build_task(cfg, data, dev, run_dir, gene_ids, fingerprint)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if dev.type == "cuda" else "cpu",
            devices=1,
            precision="bf16-mixed" if precision == "bf16-mixed" else "32-true",
            deterministic=dev.type == "cpu",
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=progress,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=str(run_dir),
        )
        t0 = time.time()
        trainer.fit(task, ckpt_path=None if continue_from is None else str(continue_from))
        wall = time.time() - t0
        if not task.history:
            raise DgexError(f"training of {run_dir} ran no epoch")
        # a resume whose every epoch was already done runs none: the history comes from the checkpoint
        _write_history(run_dir / "history.csv", task.history)

        # evaluate the selected models on every evaluation split
        frames = []
        for sel in SELECTIONS:
            path = run_dir / f"best_{sel}.pt"
            if task.best.get(sel, {}).get("epoch") is None:  # no such split, or never a finite error
                continue
            model, _ = load_weights(path, gene_ids=gene_ids)
            model.to(dev)
            for split in EVAL_SPLITS:
                if split not in data:
                    continue
                x, y = data[split]
                with torch.no_grad():
                    xt = torch.as_tensor(x, device=dev)
                    pred = (
                        torch.cat(
                            [
                                model(xt[s : s + cfg.eval_batch_size]).float()
                                for s in range(0, len(xt), cfg.eval_batch_size)
                            ]
                        )
                        .cpu()
                        .numpy()
                    )
                frames.append(per_gene_frame(targets, "D-GEX", sel, split, y, pred))
        import pandas as pd

        write_per_gene(run_dir / "per_gene.csv", pd.concat(frames, ignore_index=True))
        n_tr = data["geo-tr"][0].shape[0]
        epochs_run = len(task.history)
        train_seconds = sum(r["seconds"] for r in task.history)
        model = task.model
        summary = {
            "dgex_version": __version__,
            "config": asdict(cfg),
            "base_lr": cfg.base_lr,
            "final_lr": task.lr,
            "dataset": str(dataset),
            "dataset_fingerprint": fingerprint["sha256"],
            "n_train": n_tr,
            "n_landmarks": model.n_in,
            "n_targets": model.n_out,
            "parameters": model.n_parameters(),
            "epochs": epochs_run,
            "best": task.best,
            "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "gpu_lease": None if lease is None else {"gpu": lease.gpu, "source": lease.source},
            "wall_seconds": wall,
            "profiles_per_second": n_tr * len(task.history) / max(train_seconds, 1e-9),
            "train_flops_per_sample": 3 * model.flops_per_sample(),
        }
        warning = worse_than_trivial(task.best["geo-va"]["mae"], data["geo-tr"][1], data["geo-va"][1], cfg.base_lr)
        if warning:
            log.warning("%s: %s", run_dir, warning)
            summary["warning"] = warning  # only then: a normal run's run.json is unchanged
        write_json(run_dir / "run.json", summary)
        if not keep_last:
            last.unlink(missing_ok=True)
        log.info(
            "trained %dx%d dropout %.2f part %s: best geo-va %.4f (epoch %s) in %.1f s",
            layers,
            units,
            dropout,
            "all" if part is None else part,
            task.best["geo-va"]["mae"],
            task.best["geo-va"]["epoch"],
            wall,
        )
    finally:
        if lease is not None:  # a failed run must not keep the GPU from the next job
            lease.release()
        if run_lock is not None:
            os.close(run_lock)
    return summary
