"""Finished run folders, as ``dgex train`` and ``dgex baseline`` write them.

A run folder holds ``run.json`` (written last: its presence marks the run
finished), ``per_gene.csv`` and, for D-GEX, ``history.csv`` and one
``best_<selection>.pt`` per validation split that selected an epoch.  The
stages that read runs (aggregate, export, interpret) go through here so that
they accept and reject the same folders with the same messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from .dataset import SELECTIONS
from .errors import ConfigError, InputError


def read_run_info(run_dir) -> dict:
    """The parsed ``run.json`` of ``run_dir``; a one-line error if it is missing or corrupt."""
    run_dir = Path(run_dir)
    path = run_dir / "run.json"
    if not path.is_file():
        raise InputError(
            f"{run_dir}: no run.json, so the run did not finish (or this is not a run folder); "
            f"train it with `dgex train` or rerun the workflow to complete it"
        )
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: corrupt run.json ({exc}); delete the run folder and retrain it") from None


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
        info = read_run_info(r)
        try:
            cfg = info["config"]
            arch = (int(cfg["layers"]), int(cfg["units"]), float(cfg["dropout"]))
            part = cfg["part"]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{r / 'run.json'}: not a D-GEX run ({exc!r} missing or invalid); pass folders written by `dgex train`"
            ) from None
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
