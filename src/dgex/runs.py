"""Finished run folders, as ``dgex train`` and ``dgex baseline`` write them.

A run folder holds ``run.json`` (written last: its presence marks the run
finished), ``per_gene.csv`` and, for D-GEX, ``history.csv`` and one
``best_<selection>.pt`` per validation split that selected an epoch.  The
stages that read runs (aggregate, export, interpret) go through here so that
they accept and reject the same folders with the same messages.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .dataset import EVAL_SPLITS, SELECTIONS
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)


def lock_run_dir(run_dir) -> int | None:
    """Hold an exclusive lock on the folder ``run_dir`` (its own inode: no lock file is left behind).

    Two ``dgex train`` on one folder would clear and overwrite each other's
    files (e.g. a rerun while the job of a killed Snakemake still runs): the
    second one stops with one line instead.  The kernel drops the lock when
    the process ends, however it ends.  Returns the descriptor to close (or
    None where the folder does not exist yet, or the file system cannot lock
    folders, e.g. some network file systems).
    """
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InputError(
                f"{run_dir}: another dgex train is writing this run folder; wait for it to finish "
                "(or stop it), then rerun"
            ) from None
        log.debug("cannot lock %s (%s): running without a run-folder lock", run_dir, exc)
        return None
    return fd


def read_run_info(run_dir) -> dict:
    """The parsed ``run.json`` of ``run_dir`` (a JSON object); a one-line error if it is missing or corrupt."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.is_file():
        raise InputError(
            f"{run_dir}: no run.json, so the run did not finish (or this is not a run folder); "
            f"train it with `dgex train` or rerun the workflow to complete it"
        )
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: corrupt run.json ({exc}); delete the run folder and retrain it") from None
    if not isinstance(info, dict):
        raise InputError(
            f"{path}: corrupt run.json (a JSON {type(info).__name__}, not an object); delete the run folder and "
            f"retrain it"
        )
    return info


def _is_int(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _dgex_problem(info: dict) -> str | None:
    """What a D-GEX run.json lacks (``dgex train``'s keys the readers rely on), or None."""
    cfg = info.get("config")
    if not isinstance(cfg, dict):
        return "no 'config' object"
    for key in ("layers", "units"):
        if not _is_int(cfg.get(key), 1):
            return f"config.{key} is {cfg.get(key)!r}, not an integer >= 1"
    dropout = cfg.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"config.dropout is {dropout!r}, not a number in [0, 1)"
    if "part" not in cfg or not (cfg["part"] is None or _is_int(cfg["part"], 0)):
        return f"config.part is {cfg.get('part', '(missing)')!r}, not a part number or null"
    if not _is_int(info.get("n_targets"), 1):
        return f"n_targets is {info.get('n_targets', '(missing)')!r}, not an integer >= 1"
    if not isinstance(info.get("best"), dict):
        return "no 'best' object"
    fp = info.get("dataset_fingerprint")
    if fp is not None and not isinstance(fp, str):
        return "dataset_fingerprint is not a string"
    return None


def read_dgex_run(run_dir) -> dict:
    """The checked ``run.json`` of a D-GEX run folder (see :func:`_dgex_problem`); one-line errors otherwise.

    Adds ``arch`` = ``(layers, units, dropout)`` and ``part`` (None = all targets).
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if "config" not in info and isinstance(info.get("method"), str):
        raise InputError(
            f"{run_dir}: a baseline run ({info['method']}), not a D-GEX run; pass it with --baseline-runs "
            f"(D-GEX runs are the folders `dgex train` writes)"
        )
    problem = _dgex_problem(info)
    if problem:
        raise InputError(
            f"{run_dir / 'run.json'}: not a complete D-GEX run.json ({problem}); delete the run folder and retrain it"
        )
    cfg = info["config"]
    info["arch"] = (int(cfg["layers"]), int(cfg["units"]), float(cfg["dropout"]))
    info["part"] = cfg["part"]
    return info


def read_baseline_run(run_dir) -> dict:
    """The checked ``run.json`` of a baseline run folder (``dgex baseline``); one-line errors otherwise."""
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    if "method" not in info and isinstance(info.get("config"), dict):
        raise InputError(
            f"{run_dir}: a D-GEX run, not a baseline run; pass it with --dgex-runs "
            f"(baseline runs are the folders `dgex baseline` writes)"
        )
    if not isinstance(info.get("method"), str) or not info["method"]:
        raise InputError(
            f"{run_dir / 'run.json'}: not a complete baseline run.json (no 'method'); delete the run folder and "
            f"rerun `dgex baseline`"
        )
    return info


#: Columns of a D-GEX history.csv the readers need (``dgex train`` writes one row per epoch, with more).
HISTORY_COLUMNS = ("epoch", "geo-va")


def read_history(path) -> pd.DataFrame:
    """A D-GEX run's ``history.csv`` (one row per epoch), checked; one-line errors naming the file otherwise."""
    path = Path(path)
    fix = "delete the run folder and retrain it"
    if not path.is_file():
        raise InputError(f"{path}: training history not found; {fix}")
    try:
        hist = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser and empty-data errors are ValueErrors
        reason = (str(exc).splitlines() or [""])[0][:120]
        raise InputError(f"{path}: cannot parse the training history ({reason}); {fix}") from None
    missing = [c for c in HISTORY_COLUMNS if c not in hist.columns]
    if missing:
        raise InputError(f"{path}: training history lacks column(s) {', '.join(missing)}; {fix}")
    splits = [c for c in dict.fromkeys((*HISTORY_COLUMNS, *EVAL_SPLITS)) if c in hist.columns]
    try:
        hist[splits] = hist[splits].astype(float)
    except ValueError:
        raise InputError(f"{path}: non-numeric values in the training history; {fix}") from None
    epochs = hist["epoch"].to_numpy()
    if len(hist) == 0 or not np.array_equal(epochs, np.arange(1, len(hist) + 1)):
        raise InputError(f"{path}: the training history's epochs are not 1..n ({len(hist)} rows); {fix}")
    hist["epoch"] = hist["epoch"].astype(int)
    return hist


def check_dataset(recorded: dict, fingerprint: dict, dataset) -> None:
    """Every run must have been trained on ``dataset``, whose content fingerprint is ``fingerprint``.

    ``recorded``: ``{run folder: the dataset_fingerprint its run.json records (None if none)}``.  A run
    trained on another dataset with the same genes would otherwise be paired silently with the wrong
    statistics or splits.  Runs of a dgex that recorded no fingerprint are logged, not refused.
    """
    unknown = [d for d, fp in recorded.items() if fp is None]
    if unknown:
        log.warning(
            "%d run(s) record no dataset fingerprint in run.json (older dgex), e.g. %s: cannot check that they were "
            "trained on %s",
            len(unknown),
            unknown[0],
            dataset,
        )
    for run_dir, fp in recorded.items():
        if fp is not None and fp != fingerprint["sha256"]:
            raise InputError(
                f"{run_dir} was trained on another dataset than {dataset} (the dataset fingerprint in its "
                f"run.json differs: other samples, splits, values or statistics); pass the dataset the runs "
                f"were trained on, or retrain them on this one"
            )


def load_runs(runs, selection: str) -> list[dict]:
    """The D-GEX part runs of one network, sorted by part (a run on all targets first).

    Each: ``{"dir", "info" (run.json), "config", "arch": (layers, units, dropout),
    "part" (None = all targets), "checkpoint": best_<selection>.pt}``.  All runs
    must share one grid point, give each part once, and hold the checkpoint.
    """
    if selection not in SELECTIONS:
        raise ConfigError(f"--selection must be one of {', '.join(SELECTIONS)} (got {selection!r})")
    if not runs:
        raise ConfigError("no run folders given; pass the part runs of one trained network with --runs")
    out = []
    for r in map(Path, runs):
        info = read_dgex_run(r)
        cfg, arch, part = info["config"], info["arch"], info["part"]
        ckpt = r / f"best_{selection}.pt"
        if not ckpt.is_file():
            other = [s for s in SELECTIONS if s != selection and (r / f"best_{s}.pt").is_file()]
            hint = f"use --selection {other[0]}" if other else "retrain the run"
            raise InputError(f"{r}: no best_{selection}.pt (model selected by {selection}); {hint}")
        out.append({"dir": r, "info": info, "config": cfg, "arch": arch, "part": part, "checkpoint": ckpt})
    archs = {o["arch"] for o in out}
    if len(archs) > 1:
        names = ", ".join(f"{a[0]}x{a[1]} dropout {a[2]:g}" for a in sorted(archs))
        raise InputError(f"the runs belong to different networks ({names}); pass the part runs of one grid point")
    parts = [o["part"] for o in out]
    if None in parts and len(parts) > 1:
        raise InputError("a run trained on all targets (part 'all') cannot be combined with other runs; pass it alone")
    if len(set(parts)) != len(parts):
        dup = sorted({p for p in parts if parts.count(p) > 1})
        raise InputError(f"target part(s) {dup} given more than once; pass each part run of the network once")
    return sorted(out, key=lambda o: -1 if o["part"] is None else o["part"])
