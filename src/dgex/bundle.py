"""Model bundles: one self-contained folder per trained D-GEX model, for inference on users' data.

``dgex export`` gathers the part runs of one grid point (one network per
target part) and the statistics of the processed dataset they were trained
on into a folder that ``dgex infer`` (or :func:`load_bundle` +
:meth:`Bundle.predict`) needs nothing else to use.  Layout
(:data:`BUNDLE_FORMAT` = 1)::

    bundle.json          format + version, dgex version, creation time, selection,
                         architecture, training config, per-part files/epochs/metrics,
                         overall metrics (gene-weighted over parts), sha256 of every file
    weights_part<k>.pt   {"state_dict", "shape": [n_in, n_out, layers, units], "dropout"}
                         (``weights_all.pt`` for a single network trained on all targets)
    landmarks.tsv        ensembl, entrez, symbol, probe       (L rows, network input order)
    targets.tsv          ensembl, entrez, symbol, part        (T rows, output order: parts concatenated)
    stats.npz            landmark_mean, landmark_std (L,); target_mean, target_std (T,): GEO statistics;
                         epsilon, standardize; gene_quantiles (L+T,): the dataset's GEO reference;
                         landmark_quantiles (L,): mean sorted GEO landmark profile (for --quantile-normalize);
                         probe_quantiles (P,) if GEO was quantile normalised in preprocess

Inputs are standardised as ``(x - mean) / (std + epsilon)`` and outputs
mapped back with ``y * (std + epsilon) + mean``, so both sides of the model
are on the GEO log2-expression scale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from . import __version__
from .acquire import sha256_file
from .dataset import EVAL_SPLITS, ProcessedDataset
from .errors import ConfigError, InputError
from .io import atomic_dir, save_torch, write_json
from .models import DGEX
from .runs import load_runs

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
BUNDLE_KIND = "dgex-model-bundle"
LANDMARK_COLUMNS = ["ensembl", "entrez", "symbol", "probe"]
TARGET_COLUMNS = ["ensembl", "entrez", "symbol", "part"]
#: Extensions that promise a file or an archive: a bundle folder is not named so.
FILE_SUFFIXES = {".zip", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".pt", ".pth", ".ckpt", ".json", ".h5", ".gctx", ".csv"}


def _weights_name(part) -> str:
    return "weights_all.pt" if part is None else f"weights_part{int(part)}.pt"


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
def runs_from_aggregate(aggregate_dir, selection: str = "geo-va") -> tuple[list[Path], dict]:
    """The part run folders of the grid point chosen on validation in an aggregate folder.

    ``selection`` geo-va picks the paper's GEO task choice (lowest GEO-va MAE,
    :func:`dgex.tables.choose` with task ``geo``), 1000g-va the cross-platform
    choice.  Returns ``(run_dirs, pick)``.
    """
    from .aggregate import load_aggregate
    from .tables import choose

    agg = load_aggregate(aggregate_dir)
    pick = choose(agg["summary"], "geo" if selection == "geo-va" else "cross")
    if pick is None:
        raise InputError(
            f"{aggregate_dir}: no D-GEX runs selected by {selection} in the aggregate; "
            f"aggregate trained D-GEX runs first or pass --runs"
        )
    runs = agg["runs"]
    sel = runs[
        (runs["method"] == "D-GEX")
        & (runs["layers"] == pick["layers"])
        & (runs["units"] == pick["units"])
        & np.isclose(runs["dropout"].astype(float), pick["dropout"])
    ]
    if sel.empty:
        raise InputError(
            f"{aggregate_dir}/runs.csv lists no run of the chosen grid point {pick['layers']}x"
            f"{pick['units']} dropout {pick['dropout']:g}; rerun `dgex aggregate`"
        )
    dirs = [Path(d) for d in sel["dir"]]
    log.info(
        "%s: %s chose %dx%d dropout %g (validation MAE %.4f): %s",
        aggregate_dir,
        selection,
        pick["layers"],
        pick["units"],
        pick["dropout"],
        pick["validation_mae"],
        ", ".join(map(str, dirs)),
    )
    return dirs, pick


def _check_parts(runs: list[dict], n_parts: int) -> None:
    """The runs (from :func:`dgex.runs.load_runs`) must be one run on all targets or one run per dataset part."""
    parts = [r["part"] for r in runs]
    if parts == [None]:
        return
    outside = [r for r in runs if not 0 <= r["part"] < n_parts]
    if outside:
        raise InputError(
            f"{outside[0]['dir']} was trained on target part {outside[0]['part']} but the dataset has "
            f"parts 0..{n_parts - 1}; use the dataset the runs were trained on"
        )
    missing = sorted(set(range(n_parts)) - set(parts))
    if missing:
        raise InputError(
            f"target part(s) {', '.join(map(str, missing))} missing: pass one run folder per part "
            f"(0..{n_parts - 1}) of the grid point"
        )


def _landmark_reference(
    dataset, mean: np.ndarray, std: np.ndarray, epsilon: float, chunk: int = 16384, progress: bool = False
) -> np.ndarray:
    """Mean sorted GEO landmark profile on the expression scale, ``(L,)``, streamed over the GEO splits.

    The dataset's ``gene_quantiles`` span landmarks *and* targets; inputs that
    hold only landmarks (L1000) are rank-mapped onto this landmark-only reference.
    """
    from tqdm.auto import tqdm

    total, n = np.zeros(len(mean)), 0
    with h5py.File(dataset, "r") as h5:
        splits = [h5[f"splits/{s}/X"] for s in ("geo-tr", "geo-va", "geo-te") if f"splits/{s}/X" in h5]
        with tqdm(
            total=sum(d.shape[0] for d in splits), unit="profile", desc="landmark reference", disable=not progress
        ) as bar:
            for ds in splits:
                for s in range(0, ds.shape[0], chunk):
                    x = ds[s : s + chunk].astype(np.float64) * (std + epsilon) + mean
                    total += np.sort(x, axis=1).sum(axis=0)
                    n += x.shape[0]
                    bar.update(x.shape[0])
    if n == 0:
        raise InputError(f"{dataset}: no GEO splits to build the landmark reference from; rerun `dgex preprocess`")
    return total / n


def _landmark_probes(ensembl: pd.Series) -> pd.Series:
    """The L1000 / HG-U133A probe of each landmark gene from the built-in D-GEX map ('' if not in it)."""
    from .genes import data_path, read_gene_map

    lm = read_gene_map(data_path("map_lm.txt"))
    first = lm.set_index("ensembl")["probes"].map(lambda p: p[0] if p else "")
    return ensembl.map(first).fillna("")


def _weighted_metrics(parts: list[dict]) -> dict:
    """Overall MAE per split over all targets: the parts' MAEs weighted by their gene counts."""
    out = {}
    for split in EVAL_SPLITS:
        vals = [(p["metrics"].get(split), p["n_targets"]) for p in parts]
        if all(v is not None for v, _ in vals):
            out[split] = float(sum(v * n for v, n in vals) / sum(n for _, n in vals))
    return out


def export_bundle(
    *,
    dataset,
    output,
    runs=None,
    grid_aggregate=None,
    selection: str = "geo-va",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a model bundle from the part runs of one grid point; returns ``bundle.json``'s content.

    Give either ``runs`` (the part run folders) or ``grid_aggregate`` (an
    aggregate folder: its validation-chosen grid point is exported).
    """
    from .train import load_weights

    if bool(runs) == bool(grid_aggregate):
        raise InputError("pass either --runs (the part run folders of one grid point) or --grid-aggregate, not both")
    output = Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    pick = None
    if grid_aggregate:
        runs, pick = runs_from_aggregate(grid_aggregate, selection)
    run_list = load_runs(runs, selection)

    with ProcessedDataset(dataset) as ds:
        genes = ds.genes()
        mean, std = ds.stats("geo")
        epsilon = float(ds.attrs.get("epsilon", 1e-3))
        standardize = str(ds.attrs.get("standardize", ""))
        gene_q = ds.reference("gene_quantiles")
        try:
            probe_q = ds.reference("probe_quantiles")
        except KeyError:
            probe_q = None
        ds_params = ds.params
    L = len(genes.landmarks)
    _check_parts(run_list, genes.n_parts)

    landmark_ids = genes.landmarks["ensembl"].tolist()
    tg_parts = genes.targets["part"].to_numpy()
    networks, part_info, target_idx = [], [], []
    for run in run_list:  # sorted by part: the output order
        part = run["part"]
        idx = np.arange(len(tg_parts)) if part is None else np.flatnonzero(tg_parts == part)
        gene_ids = {"landmarks": landmark_ids, "targets": genes.targets["ensembl"].iloc[idx].tolist()}
        model, blob = load_weights(run["checkpoint"], n_in=L, n_out=len(idx), gene_ids=gene_ids)
        row = blob.get("metrics", {})
        networks.append((part, model))
        part_info.append(
            {
                "epoch": int(blob.get("epoch", 0)),
                "run_dir": str(run["dir"]),
                "metrics": {s: float(row[s]) for s in EVAL_SPLITS if row.get(s) is not None},
                "best": run["info"].get("best", {}),
            }
        )
        target_idx.append(idx)
    tg_index = np.concatenate(target_idx)

    lm = genes.landmarks[["ensembl", "entrez", "symbol"]].copy()
    lm["probe"] = _landmark_probes(lm["ensembl"]).values
    tg = genes.targets.iloc[tg_index][["ensembl", "entrez", "symbol", "part"]].copy()
    stats = {
        "landmark_mean": mean[:L],
        "landmark_std": std[:L],
        "target_mean": mean[L:][tg_index],
        "target_std": std[L:][tg_index],
        "epsilon": epsilon,
        "standardize": standardize,
        "gene_quantiles": gene_q,
        "landmark_quantiles": _landmark_reference(dataset, mean[:L], std[:L], epsilon, progress=progress),
    }
    if probe_q is not None:
        stats["probe_quantiles"] = probe_q
    cfg = dict(run_list[0]["config"])
    cfg.pop("part", None)
    for p, n in zip(part_info, target_idx):
        p["n_targets"] = len(n)
    info = write_bundle(
        output,
        networks=networks,
        landmarks=lm,
        targets=tg,
        stats=stats,
        overwrite=overwrite,
        part_info=part_info,
        extra={
            "selection": selection,
            "training": cfg,
            "grid_choice": pick,
            "metrics": _weighted_metrics(part_info),
            "dataset": {
                "path": str(dataset),
                "standardize": standardize,
                "epsilon": epsilon,
                "n_landmarks": L,
                "n_targets": int(len(genes.targets)),
                "params": ds_params,
            },
        },
    )
    arch = info["architecture"]
    log.info(
        "exported %d network(s) (%dx%d, %d landmarks -> %d targets, selected by %s) to %s",
        len(networks),
        arch["layers"],
        arch["units"],
        L,
        len(tg_index),
        selection,
        output,
    )
    return info


def write_bundle(
    output,
    *,
    networks: list,
    landmarks: pd.DataFrame,
    targets: pd.DataFrame,
    stats: dict,
    part_info: list[dict] | None = None,
    extra: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a bundle folder atomically (temporary folder renamed into place); returns ``bundle.json``'s content.

    ``networks``: ``[(part, DGEX)]`` in output order (part ``None`` = one network
    for all targets); ``landmarks`` (L rows: ensembl, entrez, symbol, probe) and
    ``targets`` (T rows: ensembl, entrez, symbol, part) in network order;
    ``stats``: the arrays of ``stats.npz`` (see the module docstring);
    ``part_info``: extra per-part fields; ``extra``: extra top-level fields.
    """
    output = Path(output)
    if output.suffix.lower() in FILE_SUFFIXES:
        raise ConfigError(
            f"{output}: a model bundle is a folder, but the name ends in {output.suffix} like a file or archive; "
            f"name it without that extension (e.g. {output.with_suffix('').name})"
        )
    if output.exists() and not overwrite:
        raise InputError(f"{output} exists; pass --overwrite to replace it or choose another --output")
    with atomic_dir(output, overwrite) as tmp:
        parts, start = [], 0
        for k, (part, model) in enumerate(networks):
            name = _weights_name(part)
            shape = [model.n_in, model.n_out, model.n_layers, model.n_units]
            save_torch(
                {
                    "state_dict": {key: v.detach().cpu() for key, v in model.state_dict().items()},
                    "shape": shape,
                    "dropout": float(model.dropout_rate),
                },
                tmp / name,
                atomic=False,
            )
            parts.append(
                {
                    "part": part,
                    "file": name,
                    "n_targets": model.n_out,
                    "target_start": start,
                    "shape": shape,
                    **(part_info[k] if part_info else {}),
                }
            )
            start += model.n_out
        lm = landmarks.copy()
        if "probe" not in lm.columns:
            lm["probe"] = ""
        lm[LANDMARK_COLUMNS].to_csv(tmp / "landmarks.tsv", sep="\t", index=False)
        tg = targets.copy()
        if [p for p, _ in networks] == [None]:
            tg["part"] = "all"
        tg[TARGET_COLUMNS].to_csv(tmp / "targets.tsv", sep="\t", index=False)
        arrays = {k: np.asarray(v) for k, v in stats.items()}
        arrays["epsilon"] = np.float64(stats["epsilon"])
        np.savez(tmp / "stats.npz", **arrays)
        first = parts[0]["shape"]
        info = {
            "format": BUNDLE_KIND,
            "format_version": BUNDLE_FORMAT,
            "dgex_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "architecture": {
                "n_landmarks": first[0],
                "n_targets": start,
                "layers": first[2],
                "units": first[3],
                "dropout": float(networks[0][1].dropout_rate),
                "hidden_activation": "tanh",
                "n_parts": len(parts),
            },
            **(extra or {}),
            "parts": parts,
            "files": {f: sha256_file(tmp / f) for f in sorted(p.name for p in tmp.iterdir())},
        }
        write_json(tmp / "bundle.json", info)
    return info


# --------------------------------------------------------------------------- #
# loading
# --------------------------------------------------------------------------- #
@dataclass
class Bundle:
    """A loaded model bundle.

    ``landmarks`` (L rows) and ``targets`` (T rows) are the input and output
    gene tables in network order; ``networks[i]`` predicts the targets
    ``part_slices[i]``.  Statistics live as float32 tensors on ``device``.
    """

    path: Path
    info: dict
    landmarks: pd.DataFrame
    targets: pd.DataFrame
    stats: dict
    networks: list
    part_slices: list
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def n_landmarks(self) -> int:
        return len(self.landmarks)

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def epsilon(self) -> float:
        return float(self.stats["epsilon"])

    def to(self, device) -> "Bundle":
        """Move the networks and statistics tensors to ``device``; returns self."""
        self.device = torch.device(device)
        for net in self.networks:
            net.to(self.device)
        eps = self.epsilon
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=self.device)  # noqa: E731
        self._lm_mean = as_t(self.stats["landmark_mean"])
        self._lm_scale = as_t(np.asarray(self.stats["landmark_std"], dtype=np.float64) + eps)
        self._tg_mean = as_t(self.stats["target_mean"])
        tg_mean = np.asarray(self.stats["target_mean"], dtype=np.float64)
        tg_scale = np.asarray(self.stats["target_std"], dtype=np.float64) + eps
        # the inverse target standardisation folded into each output layer (y = (W s) h + (b s + m)):
        # one pass over the output instead of three
        self._out_layers = []
        for net, sl in zip(self.networks, self.part_slices):
            w = net.output.weight.detach().double().cpu().numpy() * tg_scale[sl, None]
            b = net.output.bias.detach().double().cpu().numpy() * tg_scale[sl] + tg_mean[sl]
            self._out_layers.append((as_t(w), as_t(b)))
        self._workspace: dict = {}
        return self

    def _buffers(self, n: int) -> dict:
        """Reused per-batch-size activations (fresh allocations page-fault on every batch)."""
        ws = self._workspace.get(n)
        if ws is None:
            if len(self._workspace) >= 2:
                self._workspace.clear()
            kw = dict(dtype=torch.float32, device=self.device)
            ws = {
                "z": torch.empty((n, self.n_landmarks), **kw),
                "h": [torch.empty((n, layer.out_features), **kw) for layer in self.networks[0].hidden]
                if len({net.n_units for net in self.networks}) == 1
                else None,
            }
            self._workspace[n] = ws
        return ws

    @torch.inference_mode()
    def predict_tensor(
        self, x: torch.Tensor, present: torch.Tensor | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Targets on the expression scale ``(n, T)`` from landmark expression on ``self.device``.

        ``x`` is ``(n, L)``, or ``(n, k)`` with ``present`` the ``(k,)`` landmark
        indices it holds; absent landmarks get the GEO mean (0 after
        standardisation).  ``out``: an ``(n, T)`` float32 tensor to fill.
        The networks run in eval mode (no dropout), layer by layer into reused buffers.
        """
        n = x.shape[0]
        ws = self._buffers(n)
        z = ws["z"]
        if present is None:
            torch.sub(x, self._lm_mean, out=z).div_(self._lm_scale)
        else:
            z.zero_()
            z[:, present] = (x - self._lm_mean[present]) / self._lm_scale[present]
        if out is None:
            out = torch.empty((n, self.n_targets), dtype=torch.float32, device=self.device)
        for net, sl, (w_out, b_out) in zip(self.networks, self.part_slices, self._out_layers):
            h = z
            for k, layer in enumerate(net.hidden):
                buf = ws["h"][k] if ws["h"] is not None else None
                h = (
                    torch.addmm(layer.bias, h, layer.weight.t(), out=buf)
                    if buf is not None
                    else torch.addmm(layer.bias, h, layer.weight.t())
                )
                h.tanh_()
            torch.addmm(b_out, h, w_out.t(), out=out[:, sl])
        return out

    def predict(self, x, quantile_normalize: bool = False, batch_size: int = 4096) -> np.ndarray:
        """Predict target expression ``(n_samples, T)`` from landmark expression ``(n_samples, L)``.

        ``x`` is log2 expression on the GEO scale with columns in
        ``self.landmarks`` order; see :func:`dgex.infer.predict`, which this calls.
        """
        from .infer import predict  # infer builds on this module

        return predict(self, x, quantile_normalize=quantile_normalize, batch_size=batch_size)


def _corrupt(path: Path, what: str) -> InputError:
    return InputError(f"{path}: corrupt model bundle ({what}); re-export it with `dgex export`")


def load_bundle(path, device="cpu", verify: bool = True) -> Bundle:
    """Load and check a bundle folder written by :func:`export_bundle`.

    Checks the format version, that every file is present, that gene tables,
    statistics and weights agree in size, and (``verify``) the files' sha256.
    """
    path = Path(path)
    meta = path / "bundle.json"
    if not path.is_dir() or not meta.exists():
        raise InputError(f"{path}: not a dgex model bundle (no bundle.json); pass a folder written by `dgex export`")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _corrupt(path, f"bundle.json unreadable: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_KIND:
        raise InputError(
            f"{path}: bundle.json is not a dgex model bundle description; pass a folder written by `dgex export`"
        )
    if info.get("format_version") != BUNDLE_FORMAT:
        raise InputError(
            f"{path}: bundle format version {info.get('format_version')!r} (written by dgex "
            f"{info.get('dgex_version')}), this dgex {__version__} reads version {BUNDLE_FORMAT}; "
            f"re-export the model with `dgex export` of this version"
        )
    try:
        files, parts, arch = info["files"], info["parts"], info["architecture"]
        L, T = int(arch["n_landmarks"]), int(arch["n_targets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"bundle.json lacks {exc}") from None
    missing = [f for f in files if not (path / f).exists()]
    if missing:
        raise _corrupt(path, f"missing file(s) {', '.join(missing)}")

    try:
        lm = pd.read_csv(path / "landmarks.tsv", sep="\t", dtype=str, keep_default_na=False)
        tg = pd.read_csv(path / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
        with np.load(path / "stats.npz", allow_pickle=False) as z:
            stats = {k: z[k] for k in z.files}
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise _corrupt(path, f"unreadable gene tables or stats.npz: {exc}") from None
    for name, table, cols in (("landmarks.tsv", lm, LANDMARK_COLUMNS[:3]), ("targets.tsv", tg, TARGET_COLUMNS)):
        if not set(cols) <= set(table.columns):
            raise _corrupt(path, f"{name} lacks columns {sorted(set(cols) - set(table.columns))}")
    if "probe" not in lm.columns:
        lm["probe"] = ""
    need = ("landmark_mean", "landmark_std", "target_mean", "target_std", "epsilon", "landmark_quantiles")
    if any(k not in stats for k in need):
        raise _corrupt(path, f"stats.npz lacks {', '.join(k for k in need if k not in stats)}")
    sizes = {
        "landmarks.tsv": len(lm),
        "stats landmark_mean": len(stats["landmark_mean"]),
        "stats landmark_std": len(stats["landmark_std"]),
        "stats landmark_quantiles": len(stats["landmark_quantiles"]),
    }
    tsizes = {
        "targets.tsv": len(tg),
        "stats target_mean": len(stats["target_mean"]),
        "stats target_std": len(stats["target_std"]),
        "parts in bundle.json": sum(int(p.get("n_targets", -1)) for p in parts),
    }
    bad = [f"{k} has {v}" for k, v in sizes.items() if v != L] + [f"{k} has {v}" for k, v in tsizes.items() if v != T]
    if bad:
        raise InputError(
            f"{path}: bundle files disagree: the model maps {L} landmarks -> {T} targets but "
            f"{'; '.join(bad)}; re-export the bundle with `dgex export`"
        )

    networks, slices = [], []
    for p in parts:
        wpath = path / p["file"]
        try:
            blob = torch.load(wpath, map_location="cpu", weights_only=True)
            n_in, n_out, layers, units = blob["shape"]
        except Exception as exc:  # torch raises many types on damaged pickles/zips
            raise _corrupt(path, f"{p.get('file')} unreadable: {type(exc).__name__}") from None
        start, n = int(p["target_start"]), int(p["n_targets"])
        if n_in != L or n_out != n:
            raise InputError(
                f"{path}: bundle files disagree: {p['file']} maps {n_in} -> {n_out} genes but the "
                f"gene tables give {L} landmarks and {n} targets for part {p['part']}; "
                f"re-export the bundle with `dgex export`"
            )
        net = DGEX(n_in, n_out, layers, units, float(blob.get("dropout", 0.0)))
        try:
            net.load_state_dict(blob["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise InputError(
                f"{path}: bundle files disagree: {p['file']} does not fit its declared shape "
                f"({str(exc).splitlines()[0]}); re-export the bundle with `dgex export`"
            ) from None
        net.eval()
        networks.append(net)
        slices.append(slice(start, start + n))
    covered = np.zeros(T, dtype=int)
    for sl in slices:
        covered[sl] += 1
    if not (covered == 1).all():
        raise _corrupt(path, "the parts do not cover every target exactly once")

    if verify:
        for name, digest in files.items():
            if sha256_file(path / name) != digest:
                raise InputError(
                    f"{path}: {name} does not match its checksum in bundle.json; the bundle is corrupt "
                    f"or was modified: re-export it with `dgex export`"
                )
    lm["entrez"] = lm["entrez"].map(_clean_entrez)
    tg["entrez"] = tg["entrez"].map(_clean_entrez)
    bundle = Bundle(path=path, info=info, landmarks=lm, targets=tg, stats=stats, networks=networks, part_slices=slices)
    return bundle.to(device)


def _clean_entrez(v: str) -> str:
    """'5720.0' -> '5720' (pandas may have written Entrez ids as floats); '' stays ''."""
    v = str(v).strip()
    with contextlib.suppress(ValueError):
        if v and float(v).is_integer():
            return str(int(float(v)))
    return v
