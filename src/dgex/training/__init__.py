"""The training layer: Lightning pieces that the ``train`` stage wires together.

* :mod:`.plan` -- the training plan (a ``LightningModule`` that receives the
  network and the recipe's settings), the classical-momentum SGD and the loss;
* :mod:`.callbacks` -- the paper's learning-rate rule, the best weights per
  selection split, the resumable checkpoint and its atomic writer;
* :mod:`.data` -- the device-backed data module (one gather per batch);
* :mod:`.logger` -- the Lightning logger that writes ``history.csv``.

Importing this package imports Lightning (as ``pl``), with its import-time notices silenced.
"""

from __future__ import annotations

import logging
import warnings

warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
import pytorch_lightning as pl  # noqa: E402  (after the filter: it warns on import)

# Lightning's INFO banners (GPU/TPU available, tips) are noise in per-run logs
for _name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)

__all__ = ["pl"]
