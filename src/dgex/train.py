"""Stage ``train``: one D-GEX network (one grid point x one target part) with Lightning.

This module only wires the training layer together (README: "The training layer"):

* the network -- :class:`dgex.models.DGEX` (architecture, initialisation, forward);
* the training plan -- :class:`dgex.training.plan.TrainingPlan` (loss, parameter
  groups with 3x for the deeper weights, classical-momentum SGD, the per-epoch
  evaluation logged through ``self.log``);
* callbacks -- :class:`~dgex.training.callbacks.PaperLRDecay` (rate x0.9 when the
  monitored training-subset MAE rose versus the previous epoch, floor 1e-5),
  :class:`~dgex.training.callbacks.BestWeights` (``best_<split>.pt``) and
  :class:`~dgex.training.callbacks.ResumableCheckpoint` (``last.ckpt``);
* the data module -- :class:`dgex.training.data.DeviceData` (data resident on
  the training device, evaluation sets as validation dataloaders);
* the logger -- :class:`dgex.training.logger.HistoryLogger` (``history.csv``).

The recipe itself is in README "Training".  A resumable checkpoint ``last.ckpt`` (every
random generator state included) lets ``--resume`` continue bit-identically
after a crash.  It records the dataset's content fingerprint and the
hyper-parameters; a checkpoint that cannot be continued (unreadable, another
dataset or other settings, more epochs done than asked for) is an error, or
with ``restart_incompatible`` (what the workflow passes) a logged restart from
scratch -- never a run that mixes two datasets or two recipes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import __version__
from .checkpoints import CHECKPOINT_FORMAT, CannotResume, load_mapped, load_weights, read_checkpoint_state
from .dataset import EVAL_SPLITS, SELECTIONS, ProcessedDataset, fingerprint_differences
from .devices import GpuLease, lease_gpu, pick_device
from .errors import ConfigError, DgexError, InputError
from .io import refuse_overwriting_inputs, sweep_stale, write_json
from .metrics import per_gene_frame, write_per_gene
from .models import DGEX
from .runs import lock_run_dir
from .settings import TrainSettings
from .training import pl
from .training.callbacks import AtomicCheckpointIO, BestWeights, PaperLRDecay, ResumableCheckpoint
from .training.data import DeviceData
from .training.logger import HistoryLogger
from .training.plan import TrainingDiverged, TrainingPlan, default_learning_rate

log = logging.getLogger(__name__)


__all__ = ["CannotResume", "TrainConfig", "TrainingDiverged", "train"]


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
        # the bounds live in one place, the settings of `dgex train` (eval_batch_size is internal)
        TrainSettings.check(asdict(self))

    @property
    def base_lr(self) -> float:
        """The initial learning rate: ``lr`` if given, else the paper's default for this depth."""
        return self.lr if self.lr is not None else default_learning_rate(self.layers)

    def resume_key(self) -> dict:
        """Everything that must match for ``--resume`` to continue the same run (``epochs`` may grow)."""
        d = asdict(self)
        d.pop("epochs")
        d.pop("eval_batch_size")
        d.pop("checkpoint_interval")
        return d


def load_training_data(dataset: ProcessedDataset, part: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (X (n, n_landmarks), Y (n, n_targets))}`` for every split; ``Y`` restricted to target ``part``."""
    if part is not None and part >= dataset.genes().n_parts:
        raise ConfigError(
            f"--part {part} does not exist: the dataset has target parts 0..{dataset.genes().n_parts - 1}"
        )
    return {s: (dataset.X(s), dataset.Y(s, part)) for s in dataset.splits}


# --------------------------------------------------------------------------- #
# resuming
# --------------------------------------------------------------------------- #
#: Files of a run folder; starting from scratch removes them all.
RUN_FILES = ("last.ckpt", *(f"best_{s}.pt" for s in SELECTIONS), "history.csv", "per_gene.csv", "run.json")


def remove_dead_temps(run_dir: Path) -> list[Path]:
    """Delete the temporary files that killed writers left for the run files of ``run_dir``."""
    return [p for name in RUN_FILES for p in sweep_stale(run_dir / name)]


def resume_problem(
    state: dict, cfg: TrainConfig, gene_ids: dict, fingerprint: dict, dataset, run_dir: Path
) -> CannotResume | None:
    """Why the checkpoint ``state`` of ``run_dir`` must not be continued with these settings and data, or None."""
    fresh = "delete the run folder to train from scratch"
    if state.get("format") != CHECKPOINT_FORMAT:
        return CannotResume(
            f"the checkpoint has layout {state.get('format', 1)}, this dgex continues layout {CHECKPOINT_FORMAT} "
            "(written by another dgex version)",
            fresh,
        )
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
            load_mapped(path)
        except Exception as exc:  # unpickling damaged bytes can raise almost any type
            return CannotResume(f"{path} is truncated or corrupt ({type(exc).__name__})", fresh)
    return None


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


def _clear_run(run_dir: Path) -> None:
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def evaluate_selected(
    run_dir: Path, best: dict, data: dict, targets, gene_ids: dict, device: torch.device, chunk: int
) -> list:
    """Per-gene errors of each selected network (``best_<selection>.pt``) on every evaluation split.

    ``best``: ``{selection: {"mae", "epoch"}}``; a selection whose epoch is None (no such split, or never a
    finite error) has no weights file and is skipped.  ``data``: ``{split: (X (n, n_in), Y (n, n_out))}``.
    """
    frames = []
    for sel in SELECTIONS:
        if best.get(sel, {}).get("epoch") is None:
            continue
        network, _ = load_weights(run_dir / f"best_{sel}.pt", gene_ids=gene_ids)
        network.to(device)
        for split in EVAL_SPLITS:
            if split not in data:
                continue
            x, y = data[split]
            xt = torch.as_tensor(x, device=device)
            with torch.no_grad():
                pred = torch.cat([network(xt[s : s + chunk]).float() for s in range(0, len(xt), chunk)])
            frames.append(per_gene_frame(targets, "D-GEX", sel, split, y, pred.cpu().numpy()))
    return frames


# --------------------------------------------------------------------------- #
# the stage's steps, in the order train() takes them
# --------------------------------------------------------------------------- #
@dataclass
class RunInputs:
    """What one run reads from the processed dataset.

    ``data``: ``{split: (X (n_samples, n_landmarks), Y (n_samples, n_targets))}`` with ``Y`` restricted to the
    run's target part; ``targets``: the part's rows of the gene table; ``gene_ids``: ``{"landmarks",
    "targets"}`` Ensembl ids in column order; ``fingerprint``: the dataset's content fingerprint.
    """

    data: dict[str, tuple[np.ndarray, np.ndarray]]
    targets: pd.DataFrame
    gene_ids: dict[str, list[str]]
    fingerprint: dict

    @property
    def n_landmarks(self) -> int:
        """Input genes of the network."""
        return self.data["geo-tr"][0].shape[1]

    @property
    def n_targets(self) -> int:
        """Output genes of the network (the run's target part)."""
        return self.data["geo-tr"][1].shape[1]


def lock_run_folder(run_dir: Path, dataset) -> int | None:
    """Refuse a run folder whose files would overwrite ``dataset``, then lock it against a second writer.

    Returns the lock's file descriptor, or None when the folder does not exist yet (it is locked once created).
    """
    refuse_overwriting_inputs([run_dir / name for name in RUN_FILES], {"--dataset": dataset}, "--output-dir")
    return lock_run_dir(run_dir)  # before anything in the folder is removed


def lease_gpu_for(device: str, gpu_lock_dir) -> GpuLease | None:
    """Lease a GPU for ``device`` "auto" or "cuda"; None for "cpu" or a ``cuda:N`` the user chose.

    Sets ``CUDA_VISIBLE_DEVICES`` before CUDA starts and logs the GPU (or SLURM's); the caller releases it.
    """
    return lease_gpu(gpu_lock_dir) if device in ("auto", "cuda") else None


def select_device(device: str, precision: str) -> torch.device:
    """Pick the training device (after a GPU lease, if any) and set torch's matmul precision for ``precision``."""
    dev = pick_device(device)
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    else:
        torch.set_float32_matmul_precision("highest")
    return dev


def read_inputs(dataset, part: int | None) -> RunInputs:
    """Read the run's training and evaluation data, target genes and dataset fingerprint."""
    with ProcessedDataset(dataset) as ds:
        if not ds.has("geo-tr") or not ds.has("geo-va"):
            raise InputError(f"{dataset}: needs geo-tr and geo-va splits; rerun `dgex preprocess`")
        data = load_training_data(ds, part)
        genes = ds.genes()
        fingerprint = ds.fingerprint()
    targets = genes.targets if part is None else genes.targets[genes.targets["part"] == part].reset_index(drop=True)
    gene_ids = {"landmarks": genes.landmarks["ensembl"].tolist(), "targets": targets["ensembl"].tolist()}
    return RunInputs(data, targets, gene_ids, fingerprint)


def resume_point(
    run_dir: Path, cfg: TrainConfig, inputs: RunInputs, dataset, resume: bool, restart_incompatible: bool
) -> Path | None:
    """Return the checkpoint to continue (``run_dir/last.ckpt``), or None to train from scratch.

    A checkpoint that must not be continued raises :class:`CannotResume`, or with ``restart_incompatible``
    is logged and ignored.
    """
    last = run_dir / "last.ckpt"
    if not resume:
        return None
    if not last.exists():
        log.info("no checkpoint in %s: starting from scratch", run_dir)
        return None
    try:
        state = read_checkpoint_state(last)
        problem = resume_problem(state, cfg, inputs.gene_ids, inputs.fingerprint, dataset, run_dir)
    except CannotResume as exc:
        problem = exc
    if problem is None:
        return last
    if restart_incompatible:
        log.warning("cannot resume %s: %s; training from scratch", run_dir, problem.problem)
        return None
    raise CannotResume(f"cannot resume {run_dir}: {problem.problem}", f"{problem.fix} (or pass --restart-incompatible)")


def prepare_run_dir(run_dir: Path, continuing: bool, run_lock: int | None) -> int:
    """Empty ``run_dir`` of an earlier run's files unless ``continuing`` it, create it and hold its lock.

    ``run_lock``: the lock taken before (None if the folder did not exist then); returns the lock held.
    """
    if not continuing:  # nothing of an earlier run may survive into this one
        _clear_run(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock_run_dir(run_dir) if run_lock is None else run_lock


@dataclass
class Callbacks:
    """The run's logger and callbacks, in the order Lightning must call them (the checkpoint last)."""

    history: HistoryLogger
    lr_rule: PaperLRDecay
    best: BestWeights
    checkpoint: ResumableCheckpoint

    def all(self) -> list:
        """Return the callbacks for ``pl.Trainer(callbacks=...)``."""
        return [self.lr_rule, self.best, self.checkpoint]


def make_callbacks(run_dir: Path, cfg: TrainConfig, inputs: RunInputs) -> Callbacks:
    """Build the history logger, the paper's rate rule, the best weights per selection split and ``last.ckpt``."""
    history = HistoryLogger(run_dir / "history.csv")
    best = BestWeights(
        run_dir,
        [s for s in SELECTIONS if s in inputs.data],
        {"config": asdict(cfg), "genes": inputs.gene_ids, "dataset_fingerprint": inputs.fingerprint["sha256"]},
    )
    # the checkpoint last: Lightning runs checkpoint callbacks after the others, so it records their state
    checkpoint = ResumableCheckpoint(
        run_dir,
        cfg.checkpoint_interval,
        {"config": cfg.resume_key(), "genes": inputs.gene_ids, "dataset": inputs.fingerprint},
        history,
    )
    return Callbacks(history, PaperLRDecay(cfg.base_lr, cfg.lr_decay, cfg.lr_min), best, checkpoint)


def make_trainer(cfg: TrainConfig, dev: torch.device, callbacks: Callbacks, run_dir: Path, progress: bool):
    """Build the Lightning ``Trainer``: one device, deterministic on the CPU, no sanity check, no model summary."""
    return pl.Trainer(
        max_epochs=cfg.epochs,
        accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if cfg.precision == "bf16-mixed" else "32-true",
        deterministic=dev.type == "cpu",
        logger=callbacks.history,
        log_every_n_steps=1,  # nothing is logged per step; silences Lightning's 'fewer batches' warning
        callbacks=callbacks.all(),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=progress,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )


def fit(
    trainer,
    plan: TrainingPlan,
    datamodule: DeviceData,
    history: HistoryLogger,
    continue_from: Path | None,
    run_dir: Path,
) -> float:
    """Run ``trainer.fit`` (from ``continue_from`` if given) and write ``history.csv``; returns the wall seconds."""
    t0 = time.time()
    try:
        trainer.fit(plan, datamodule=datamodule, ckpt_path=None if continue_from is None else str(continue_from))
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{exc} (the best checkpoints so far are kept in {run_dir})") from None
    wall = time.time() - t0
    if not history.rows:
        raise DgexError(f"training of {run_dir} ran no epoch")
    # a resume whose every epoch was already done runs none: the history comes from the checkpoint
    history.write()
    return wall


def write_per_gene_errors(run_dir: Path, best: dict, inputs: RunInputs, dev: torch.device, chunk: int) -> None:
    """``per_gene.csv``: every selected network's per-gene errors on every evaluation split."""
    frames = evaluate_selected(run_dir, best, inputs.data, inputs.targets, inputs.gene_ids, dev, chunk)
    write_per_gene(run_dir / "per_gene.csv", pd.concat(frames, ignore_index=True))


def publish(run_dir: Path, summary: dict, keep_last: bool) -> None:
    """Write ``run.json``, remove the resumable checkpoint unless ``keep_last``, and log the result."""
    write_json(run_dir / "run.json", summary)
    if not keep_last:
        (run_dir / "last.ckpt").unlink(missing_ok=True)
    cfg, best = summary["config"], summary["best"]["geo-va"]
    log.info(
        "trained %dx%d dropout %.2f part %s: best geo-va %.4f (epoch %s) in %.1f s",
        cfg["layers"],
        cfg["units"],
        cfg["dropout"],
        "all" if cfg["part"] is None else cfg["part"],
        best["mae"],
        best["epoch"],
        summary["wall_seconds"],
    )


def run_summary(
    run_dir: Path,
    cfg: TrainConfig,
    dataset,
    inputs: RunInputs,
    network: DGEX,
    callbacks: Callbacks,
    dev: torch.device,
    lease,
    wall: float,
) -> dict:
    """Collect the contents of ``run.json``: settings, dataset, network size, best epochs, device and speed.

    A run whose best geo-va MAE is far worse than the trivial predictor's (:func:`worse_than_trivial`) is
    logged and gets a ``warning``.
    """
    rows = callbacks.history.rows
    n_tr = inputs.data["geo-tr"][0].shape[0]
    train_seconds = sum(r["seconds"] for r in rows)
    summary = {
        "dgex_version": __version__,
        "config": asdict(cfg),
        "base_lr": cfg.base_lr,
        "final_lr": callbacks.lr_rule.lr,
        "dataset": str(dataset),
        "dataset_fingerprint": inputs.fingerprint["sha256"],
        "n_train": n_tr,
        "n_landmarks": network.n_in,
        "n_targets": network.n_out,
        "parameters": network.n_parameters(),
        "epochs": len(rows),
        "best": callbacks.best.best,
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "gpu_lease": None if lease is None else {"gpu": lease.gpu, "source": lease.source},
        "wall_seconds": wall,
        "profiles_per_second": n_tr * len(rows) / max(train_seconds, 1e-9),
        "train_flops_per_sample": 3 * network.flops_per_sample(),
    }
    y_tr, y_va = inputs.data["geo-tr"][1], inputs.data["geo-va"][1]
    warning = worse_than_trivial(callbacks.best.best["geo-va"]["mae"], y_tr, y_va, cfg.base_lr)
    if warning:
        log.warning("%s: %s", run_dir, warning)
        summary["warning"] = warning  # only then: a normal run's run.json is unchanged
    return summary


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
    Returns the run's summary (the contents of ``run.json``).
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
    run_lock = lock_run_folder(run_dir, dataset)
    lease = None
    try:
        remove_dead_temps(run_dir)
        if threads:
            torch.set_num_threads(int(threads))
        lease = lease_gpu_for(device, gpu_lock_dir)
        dev = select_device(device, precision)
        inputs = read_inputs(dataset, part)
        continue_from = resume_point(run_dir, cfg, inputs, dataset, resume, restart_incompatible)
        run_lock = prepare_run_dir(run_dir, continue_from is not None, run_lock)

        pl.seed_everything(seed, workers=True, verbose=False)
        # the network first: its initialisation draws from the global generator just seeded
        network = DGEX(inputs.n_landmarks, inputs.n_targets, layers, units, dropout)
        datamodule = DeviceData(
            inputs.data,
            eval_splits=EVAL_SPLITS,
            batch_size=batch_size,
            eval_batch_size=cfg.eval_batch_size,
            monitor_size=monitor_size,
            seed=seed,
        )
        plan = TrainingPlan(
            network,
            lr=cfg.base_lr,
            momentum=momentum,
            optimizer=optimizer,
            weight_decay=weight_decay,
            eval_names=datamodule.eval_names,
        )
        callbacks = make_callbacks(run_dir, cfg, inputs)
        trainer = make_trainer(cfg, dev, callbacks, run_dir, progress)
        wall = fit(trainer, plan, datamodule, callbacks.history, continue_from, run_dir)
        write_per_gene_errors(run_dir, callbacks.best.best, inputs, dev, cfg.eval_batch_size)
        summary = run_summary(run_dir, cfg, dataset, inputs, network, callbacks, dev, lease, wall)
        publish(run_dir, summary, keep_last)
    finally:
        if lease is not None:  # a failed run must not keep the GPU from the next job
            lease.release()
        if run_lock is not None:
            os.close(run_lock)
    return summary
