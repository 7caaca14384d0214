"""Bundle integrity: what a bundle must hold comes from format 1, not from its own bundle.json.

Bundles are written by ``write_bundle`` from small random networks (no training needed); each test damages a
copy in one way and expects ``load_bundle`` (and, for the main classes, ``dgex infer`` in a subprocess) to
refuse it with one line naming the bundle and the fix.  ``_rehash`` rewrites the checksums after a damage, as a
careless tool would, so that the deeper checks (keys, types, shapes, tables) are reached on their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import assert_one_line_error, run_dgex  # noqa: E402
from dgex.bundle import bundle_files, load_bundle, write_bundle  # noqa: E402
from dgex.errors import InputError  # noqa: E402
from dgex.infer import predict  # noqa: E402
from dgex.io import write_gctx  # noqa: E402
from dgex.models import DGEX  # noqa: E402

L = 6
FIX = "re-export it with `dgex export`"

# What today's write_bundle writes and load_bundle needs, written out here independently of dgex.bundle's
# constants: a key missing from these sets in the code would let a bundle without it load.
REQUIRED_TOP = {"format", "format_version", "dgex_version", "created", "architecture", "parts", "files"}
REQUIRED_ARCH = {"n_landmarks", "n_targets", "layers", "units", "dropout", "hidden_activation", "n_parts"}
REQUIRED_PART = {"part", "file", "n_targets", "target_start", "shape"}


def _write(path: Path, sizes=(4, 4), seed=0) -> Path:
    """A bundle of ``len(sizes)`` parts (``sizes=(n,)`` with part None: one network for all targets)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    T = sum(sizes)
    landmarks = pd.DataFrame(
        {
            "ensembl": [f"ENSG{i:011d}" for i in range(L)],
            "entrez": [str(100 + i) for i in range(L)],
            "symbol": [f"LM{i}" for i in range(L)],
            "probe": [f"{i}_at" for i in range(L)],
        }
    )
    part = np.repeat(np.arange(len(sizes)), sizes)
    targets = pd.DataFrame(
        {
            "ensembl": [f"ENSG{900 + i:011d}" for i in range(T)],
            "entrez": [str(900 + i) for i in range(T)],
            "symbol": [f"TG{i}" for i in range(T)],
            "part": part,
        }
    )
    nets = []
    for k, n in enumerate(sizes):
        net = DGEX(L, n, 1, 5)
        with torch.no_grad():
            net.output.weight.normal_(0, 0.5)  # outputs that clearly depend on the network
        nets.append((None if len(sizes) == 1 else k, net))
    stats = {
        "landmark_mean": rng.uniform(6, 10, L),
        "landmark_std": rng.uniform(0.5, 1.5, L),
        "target_mean": rng.uniform(4, 12, T),
        "target_std": rng.uniform(0.5, 2.0, T),
        "epsilon": 1e-3,
        "standardize": "transductive",
        "gene_quantiles": np.sort(rng.uniform(3, 13, L + T)),
        "landmark_quantiles": np.sort(rng.uniform(5, 11, L)),
    }
    write_bundle(
        path,
        networks=nets,
        landmarks=landmarks,
        targets=targets,
        stats=stats,
        part_info=[{"epoch": 3, "metrics": {"geo-va": 0.5}} for _ in sizes],
        extra={"selection": "geo-va"},
    )
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    bundle = _write(root / "bundle")
    x = np.random.default_rng(3).normal(8, 1, size=(12, L)).astype(np.float32)
    gctx = root / "in.gctx"
    write_gctx(gctx, x, [f"ENSG{i:011d}" for i in range(L)], [f"S{i}" for i in range(12)])
    return {"root": root, "bundle": bundle, "x": x, "gctx": gctx, "expected": predict(load_bundle(bundle), x)}


@pytest.fixture
def bundle(base, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(base["bundle"], dst)
    return dst


def _info(b: Path) -> dict:
    return json.loads((b / "bundle.json").read_text())


def _save_info(b: Path, info: dict) -> None:
    (b / "bundle.json").write_text(json.dumps(info))


def _rehash(b: Path) -> None:
    """Rewrite every listed checksum to match the files as they are now."""
    info = _info(b)
    info["files"] = {n: hashlib.sha256((b / n).read_bytes()).hexdigest() for n in info["files"]}
    _save_info(b, info)


def _tamper_weights(b: Path, name="weights_part0.pt") -> None:
    """Same shape, other numbers: only a checksum can tell."""
    blob = torch.load(b / name, weights_only=True)
    blob["state_dict"]["output.bias"] += 1.0
    torch.save(blob, b / name)


def _refused(b: Path, *fragments) -> str:
    with pytest.raises(InputError) as err:
        load_bundle(b)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{b}: ") and msg.endswith(FIX), msg
    for f in fragments:
        assert f in msg, msg
    return msg


def _edit(b: Path, fn, rehash=False) -> None:
    info = _info(b)
    fn(info)
    _save_info(b, info)
    if rehash:
        _rehash(b)


# --------------------------------------------------------------------------- valid bundles
def test_valid_bundles_load_and_extra_files_are_ignored(base, bundle, tmp_path, caplog):
    # a file the format does not name is never read: predictions unchanged, the file named in the log
    (bundle / "README.txt").write_text("my notes")
    with caplog.at_level(logging.INFO, logger="dgex.bundle"):
        b = load_bundle(bundle)
    np.testing.assert_array_equal(predict(b, base["x"]), base["expected"])
    # write_bundle lists exactly the format's files (one definition for writer and reader)
    assert sorted(b.info["files"]) == sorted(bundle_files(b.info["parts"]))
    assert sorted(p.name for p in base["bundle"].iterdir()) == sorted([*bundle_files(b.info["parts"]), "bundle.json"])
    assert any("README.txt" in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)
    # one network for all targets (part null, weights_all.pt) and unequal parts are valid too
    single = load_bundle(_write(tmp_path / "single", sizes=(7,)))
    assert single.n_targets == 7 and [p["file"] for p in single.info["parts"]] == ["weights_all.pt"]
    assert load_bundle(_write(tmp_path / "three", sizes=(3, 2, 4))).n_targets == 9


def test_cli_loads_a_valid_bundle(base, tmp_path):
    out = tmp_path / "p.gctx"
    res = run_dgex("infer", "--model", base["bundle"], "--input", base["gctx"], "--output", out, "--no-progress")
    assert res.returncode == 0, res.stderr and out.exists()


# --------------------------------------------------------------------------- checksums decide nothing by absence
@pytest.mark.parametrize("name", ["weights_part0.pt", "weights_part1.pt", "stats.npz", "targets.tsv", "landmarks.tsv"])
def test_a_file_without_checksum_entry_is_refused(bundle, name):
    _edit(bundle, lambda i: i["files"].pop(name))
    _refused(bundle, f"no checksum for {name}")


def test_removed_entry_and_tampered_weights(bundle):
    """Today's hole: drop the weights' entry from bundle.json, change the weights -> loaded with exit 0."""
    _edit(bundle, lambda i: i["files"].pop("weights_part0.pt"))
    _tamper_weights(bundle)
    _refused(bundle, "weights_part0.pt")


def test_tampered_weights_with_entry(bundle):
    _tamper_weights(bundle, "weights_part1.pt")
    _refused(bundle, "weights_part1.pt does not match its checksum")
    assert load_bundle(bundle, verify=False).n_targets == 8  # verify=False: the caller's explicit choice


def test_all_entries_removed(bundle):
    _edit(bundle, lambda i: i.update(files={}))
    _refused(bundle, "no checksum for landmarks.tsv, targets.tsv, stats.npz, weights_part0.pt, weights_part1.pt")


def test_unknown_listed_file_and_missing_file(bundle):
    (bundle / "notes.txt").write_text("x")
    _edit(bundle, lambda i: i["files"].update({"notes.txt": hashlib.sha256(b"x").hexdigest()}))
    _refused(bundle, "lists notes.txt, not a file of format 1")
    _edit(bundle, lambda i: i["files"].pop("notes.txt"))
    (bundle / "weights_part1.pt").unlink()
    _refused(bundle, "missing file(s) weights_part1.pt")


def test_a_folder_instead_of_a_file(bundle):
    (bundle / "stats.npz").unlink()
    (bundle / "stats.npz").mkdir()
    _refused(bundle, "missing file(s) stats.npz")


# --------------------------------------------------------------------------- required keys
def _key_sweep(bundle: Path, where, required: set) -> None:
    original = (bundle / "bundle.json").read_text()
    keys = list(where(json.loads(original)))
    assert required <= set(keys)  # the writer writes every required key
    for key in keys:
        info = json.loads(original)
        del where(info)[key]
        _save_info(bundle, info)
        if key in required:
            with pytest.raises(InputError) as err:
                load_bundle(bundle)
            msg = str(err.value)
            assert (key in msg or key.replace("_", " ") in msg) and "\n" not in msg and msg.startswith(f"{bundle}: "), (
                key,
                msg,
            )
        else:  # descriptive keys (metrics, selection, ...) are not needed to predict
            load_bundle(bundle)
    (bundle / "bundle.json").write_text(original)


def test_every_required_top_level_key(bundle):
    _key_sweep(bundle, lambda i: i, REQUIRED_TOP)


def test_every_required_architecture_key(bundle):
    _key_sweep(bundle, lambda i: i["architecture"], REQUIRED_ARCH)


@pytest.mark.parametrize("k", [0, 1])
def test_every_required_part_key(bundle, k):
    _key_sweep(bundle, lambda i: i["parts"][k], REQUIRED_PART)


# --------------------------------------------------------------------------- wrong types and values
WRONG = {
    "n_landmarks as string": (lambda i: i["architecture"].update(n_landmarks="6"), "n_landmarks"),
    "layers as float": (lambda i: i["architecture"].update(layers=1.0), "layers"),
    "units as bool": (lambda i: i["architecture"].update(units=True), "units"),
    "dropout out of range": (lambda i: i["architecture"].update(dropout=1.5), "dropout"),
    "activation": (lambda i: i["architecture"].update(hidden_activation="relu"), "relu"),
    "n_parts": (lambda i: i["architecture"].update(n_parts=3), "n_parts is 3"),
    "n_targets total": (lambda i: i["architecture"].update(n_targets=9), "architecture has 9"),
    "parts not a list": (lambda i: i.update(parts={"0": {}}), "parts"),
    "parts empty": (lambda i: i.update(parts=[]), "parts"),
    "part not an object": (lambda i: i["parts"].__setitem__(1, "weights_part1.pt"), "parts[1]"),
    "part number as string": (lambda i: i["parts"][0].update(part="0"), "part"),
    "part numbers out of order": (lambda i: i["parts"].reverse(), "numbered [1, 0]"),
    "part number repeated": (lambda i: i["parts"][1].update(part=0), "numbered [0, 0]"),
    "shape too short": (lambda i: i["parts"][0].update(shape=[6, 4, 1]), "shape"),
    "shape disagrees": (lambda i: i["parts"][1].update(shape=[6, 4, 2, 5]), "shape"),
    "negative start": (lambda i: i["parts"][0].update(target_start=-1), "target_start"),
    "n_targets as string": (lambda i: i["parts"][0].update(n_targets="4"), "n_targets"),
    "files a list": (lambda i: i.update(files=list(i["files"])), "files"),
    "checksum not hex": (lambda i: i["files"].update({"stats.npz": "abc"}), "sha256"),
    "format_version list": (lambda i: i.update(format_version=[1]), "format version [1]"),
    "format_version true": (lambda i: i.update(format_version=True), "format version True"),
    "format_version string": (lambda i: i.update(format_version="1"), "format version '1'"),
}


@pytest.mark.parametrize("case", list(WRONG))
def test_wrong_types_and_values(bundle, case):
    fn, fragment = WRONG[case]
    _edit(bundle, fn)
    msg = str(pytest.raises(InputError, load_bundle, bundle).value)
    assert fragment in msg and "\n" not in msg and msg.startswith(f"{bundle}: ") and "re-export" in msg, msg


def test_bundle_json_not_an_object(bundle):
    (bundle / "bundle.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a dgex model bundle description"):
        load_bundle(bundle)


# --------------------------------------------------------------------------- networks paired with the wrong genes
def test_weight_files_swapped_on_disk(bundle):
    (bundle / "weights_part0.pt").rename(bundle / "tmp.pt")
    (bundle / "weights_part1.pt").rename(bundle / "weights_part0.pt")
    (bundle / "tmp.pt").rename(bundle / "weights_part1.pt")
    _refused(bundle, "does not match its checksum")


def test_weight_file_names_swapped_between_parts(bundle):
    """Equal part sizes: before, part 0 silently predicted with part 1's network."""

    def swap(i):
        p0, p1 = i["parts"]
        p0["file"], p1["file"] = p1["file"], p0["file"]

    _edit(bundle, swap)
    _refused(bundle, "part 0 names weights 'weights_part1.pt', not weights_part0.pt")


def test_target_ranges_swapped_between_parts(bundle):
    def swap(i):
        p0, p1 = i["parts"]
        p0["target_start"], p1["target_start"] = p1["target_start"], p0["target_start"]

    _edit(bundle, swap)
    _refused(bundle, "part 0 starts at target 4")


def test_targets_table_parts_do_not_match_the_networks(bundle):
    tg = pd.read_csv(bundle / "targets.tsv", sep="\t", dtype=str, keep_default_na=False)
    tg["part"] = tg["part"].iloc[::-1].to_numpy()  # rows 0..3 now say part 1
    tg.to_csv(bundle / "targets.tsv", sep="\t", index=False)
    _rehash(bundle)
    _refused(bundle, "targets.tsv rows 0..3 are not all part 0", "weights_part0.pt")


def test_unequal_parts_swapped_with_their_checksums(tmp_path):
    b = _write(tmp_path / "b", sizes=(5, 3))
    (b / "weights_part0.pt").rename(b / "tmp.pt")
    (b / "weights_part1.pt").rename(b / "weights_part0.pt")
    (b / "tmp.pt").rename(b / "weights_part1.pt")
    _rehash(b)
    _refused(b, "bundle files disagree: weights_part0.pt maps 6 -> 3 genes")


# --------------------------------------------------------------------------- file contents
def _stats(b: Path) -> dict:
    with np.load(b / "stats.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda s: s.pop("landmark_quantiles"), "stats.npz lacks landmark_quantiles"),
        (lambda s: s.pop("epsilon"), "stats.npz lacks epsilon"),
        (lambda s: s["target_mean"].__setitem__(2, np.nan), "target_mean not a finite numeric vector"),
        (lambda s: s.update(landmark_std=s["landmark_std"].astype(str)), "landmark_std not a finite"),
        (lambda s: s.update(target_std=-s["target_std"]), "target_std has negative values"),
        (lambda s: s.update(epsilon=np.array([1e-3, 1e-3])), "epsilon"),
        (lambda s: s.update(target_std=s["target_std"][:-1]), "stats target_std has 7"),
    ],
)
def test_stats_contents(bundle, damage, fragment):
    stats = _stats(bundle)
    damage(stats)
    np.savez(bundle / "stats.npz", **stats)
    _rehash(bundle)
    _refused(bundle, fragment)


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda b: b.pop("dropout"), "weights_part0.pt lacks dropout"),
        (lambda b: b.pop("state_dict"), "weights_part0.pt lacks state_dict"),
        (lambda b: b.update(shape=[6, 4, 1, "5"]), "weights_part0.pt shape"),
        (lambda b: b["state_dict"].pop("output.bias"), "does not fit its declared shape"),
        (lambda b: b.update(shape=[6, 4, 2, 5]), "2x5 hidden units"),
    ],
)
def test_weights_contents(bundle, damage, fragment):
    blob = torch.load(bundle / "weights_part0.pt", weights_only=True)
    damage(blob)
    torch.save(blob, bundle / "weights_part0.pt")
    _rehash(bundle)
    _refused(bundle, fragment)


def test_weights_file_that_is_not_a_dict(bundle):
    torch.save([1, 2, 3], bundle / "weights_part1.pt")
    _rehash(bundle)
    _refused(bundle, "weights_part1.pt is list, not an object")


@pytest.mark.parametrize("table", ["landmarks.tsv", "targets.tsv"])
def test_repeated_gene_ids(bundle, table):
    df = pd.read_csv(bundle / table, sep="\t", dtype=str, keep_default_na=False)
    df.loc[2, "id"] = df.loc[1, "id"]
    df.to_csv(bundle / table, sep="\t", index=False)
    _rehash(bundle)
    _refused(bundle, f"{table} has empty or repeated ids")


# --------------------------------------------------------------------------- through the CLI
CLI_CASES = {
    "entry removed + weights tampered": (
        lambda b: (_edit(b, lambda i: i["files"].pop("weights_part0.pt")), _tamper_weights(b)),
        "no checksum for weights_part0.pt",
    ),
    "part key missing": (lambda b: _edit(b, lambda i: i["parts"][1].pop("target_start")), "lacks target_start"),
    "wrong type": (lambda b: _edit(b, lambda i: i["architecture"].update(n_targets="8")), "n_targets"),
    "weights swapped between parts": (
        lambda b: _edit(b, lambda i: [p.update(file=f"weights_part{1 - p['part']}.pt") for p in i["parts"]]),
        "names weights",
    ),
    "weights file missing": (lambda b: (b / "weights_part1.pt").unlink(), "missing file(s) weights_part1.pt"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_one_line_error(base, bundle, tmp_path, case):
    damage, fragment = CLI_CASES[case]
    damage(bundle)
    out = tmp_path / "o.gctx"
    res = run_dgex("infer", "--model", bundle, "--input", base["gctx"], "--output", out, "--no-progress")
    err = assert_one_line_error(res, str(bundle), fragment)
    assert err.endswith(FIX), err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".o.gctx")]
