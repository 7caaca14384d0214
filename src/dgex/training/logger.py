"""A Lightning logger that keeps one row per epoch and rewrites ``history.csv`` after each.

Columns: ``epoch`` (1-based), then the metrics in the order the training plan
logs them -- ``lr``, ``train_loss``, ``monitor_mae``, the evaluation splits
(``geo-va``, ``geo-te``, ``1000g-va``, ``gtex-te``, those present), ``seconds``.
Values are written as Python's ``str`` of the float the plan logged (``repr``
precision).  The file is replaced atomically; the rows travel with the
resumable checkpoint, so a resumed run rewrites the whole history.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pytorch_lightning.loggers.logger import Logger
from pytorch_lightning.utilities import rank_zero_only

from ..io import write_text


class HistoryLogger(Logger):
    """Epoch rows in memory (:attr:`rows`), written to ``path`` as CSV whenever an epoch's metrics arrive."""

    def __init__(self, path: Path, rows: list[dict] | None = None):
        super().__init__()
        self.path = Path(path)
        self._rows: list[dict] = list(rows or [])

    @property
    def name(self) -> str:
        """The logger's name, ``history``."""
        return "history"

    @property
    def version(self) -> int:
        """Always 0: one history per run folder."""
        return 0

    @property
    def rows(self) -> list[dict]:
        """``{column: value}`` per epoch so far, in order."""
        return self._rows

    def load_rows(self, rows: list[dict]) -> None:
        """Continue after ``rows`` (the history of a resumed checkpoint)."""
        self._rows = [dict(r) for r in rows]

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """Do nothing: the hyper-parameters are recorded in ``run.json`` and in the weights files."""
        pass  # recorded in run.json and in the weights files

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """One epoch's metrics; Lightning adds ``epoch`` (0-based) to them."""
        metrics = dict(metrics)
        epoch = int(metrics.pop("epoch")) + 1
        if self._rows and self._rows[-1]["epoch"] == epoch:  # more of the same epoch
            self._rows[-1].update(metrics)
        else:
            self._rows.append({"epoch": epoch, **metrics})
        self.write()

    def write(self) -> None:
        """Replace ``path`` with the rows so far (columns: every key, in order of first appearance)."""
        columns = list(dict.fromkeys(k for row in self._rows for k in row))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self._rows)
        write_text(self.path, text.getvalue())
