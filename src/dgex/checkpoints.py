"""A training run's checkpoint files, read and written in one place.

* ``best_<selection>.pt`` -- the weights of the best epoch by one selection
  split: ``{"state_dict", "config", "epoch", "metrics", "genes",
  "dataset_fingerprint", "shape": [n_in, n_out, layers, units], "dgex_version"}``.
  Written during training (:func:`save_weights`), read by the final
  evaluation, ``dgex export`` and ``dgex interpret`` (:func:`load_weights`).
* ``last.ckpt`` -- Lightning's resumable checkpoint; its :data:`SECTION`
  part holds what dgex needs to decide whether it may be continued
  (``format``, ``config``, ``genes``, ``dataset``, ``history``, ``best``,
  ``lr``, ...), read memory-mapped by :func:`read_checkpoint_state`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import __version__
from .errors import DgexError, InputError
from .io import save_torch
from .models import DGEX

#: The key of dgex's own part of a Lightning checkpoint.
SECTION = "dgex"
#: Layout of :data:`SECTION` and of the Lightning state around it; another value cannot be continued.
CHECKPOINT_FORMAT = 2


class CannotResume(DgexError):
    """``--resume`` found a checkpoint that must not be continued."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


def save_weights(path: Path, state: dict, shape: list[int], epoch: int, metrics: dict, record: dict) -> None:
    """Write ``best_*.pt``: the network's ``state`` (moved to the CPU) with its epoch and metrics row.

    ``record``: ``config`` (the run's settings), ``genes`` (``{"landmarks", "targets"}`` Ensembl ids in
    column order) and ``dataset_fingerprint`` (the dataset's SHA-256).
    """
    save_torch(
        {
            "state_dict": {k: v.cpu() for k, v in state.items()},
            "config": record["config"],
            "epoch": epoch,
            "metrics": dict(metrics),
            "genes": record["genes"],
            "dataset_fingerprint": record["dataset_fingerprint"],
            "shape": list(shape),
            "dgex_version": __version__,
        },
        path,
    )


def load_weights(
    path: str | Path, n_in: int | None = None, n_out: int | None = None, gene_ids: dict | None = None
) -> tuple[DGEX, dict]:
    """Rebuild a network (in eval mode, on the CPU) from a ``best_*.pt`` file; returns it and the file's dict.

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


def load_mapped(path: Path):
    """``torch.load`` memory-mapped (reads the pickle, not the tensors); unmapped if the file system refuses."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except FileNotFoundError:
        raise
    except Exception:  # unpickling damaged bytes can raise almost any type
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint_state(path: Path) -> dict:
    """The :data:`SECTION` part of a Lightning checkpoint, or :class:`CannotResume` if it is unreadable.

    Memory-mapped: only the small pickled state is read, not the weights.
    """
    fix = "delete it to train from scratch"
    try:
        ckpt = load_mapped(path)
    except Exception as exc:  # unpickling damaged bytes can raise almost any type
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise CannotResume(f"{path} is truncated or corrupt ({type(exc).__name__}: {reason})", fix) from None
    state = ckpt.get(SECTION) if isinstance(ckpt, dict) else None
    if (
        not isinstance(state, dict)
        or not {"config", "genes", "lr", "history", "best"} <= set(state)
        or not isinstance(state["config"], dict)
        or not isinstance(state["history"], list)
    ):
        raise CannotResume(f"{path} is not a dgex training checkpoint", fix)
    return state
