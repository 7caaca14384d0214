"""The `dgex` argument parser: constants it keeps in step with the package, and shared options."""

from __future__ import annotations

import pytest

from dgex import cli
from dgex.dataset import SELECTIONS
from dgex.infer import ID_TYPES


def test_cli_constants_match_the_package():
    # the CLI keeps its own copies so that `dgex --help` does not import numpy/h5py/torch
    assert cli.SELECTIONS == SELECTIONS
    assert cli.ID_TYPES == ID_TYPES


@pytest.mark.parametrize(
    "argv",
    [
        ["acquire", "--url", "http://127.0.0.1/x", "--output", "x"],
        ["preprocess", "--geo", "g.gctx", "--output", "d.h5"],
        [
            "train",
            "--dataset",
            "d.h5",
            "--output-dir",
            "o",
            "--layers",
            "1",
            "--units",
            "4",
            "--dropout",
            "0",
            "--part",
            "0",
        ],
        ["baseline", "lr", "--dataset", "d.h5", "--output-dir", "o"],
        ["interpret", "s2", "--dataset", "d.h5", "--runs", "r", "--output-dir", "o"],
        ["interpret", "s3", "--runs", "r", "--output-dir", "o"],
        ["export", "--dataset", "d.h5", "--runs", "r", "--output", "o"],
        ["infer", "--model", "m", "--input", "i.gctx", "--output", "o.gctx"],
    ],
)
def test_no_progress_turns_the_progress_argument_off(argv):
    parser = cli.build_parser()
    assert parser.parse_args(argv).progress is True
    assert parser.parse_args(argv + ["--no-progress"]).progress is False
    assert not hasattr(parser.parse_args(argv), "no_progress")


@pytest.mark.parametrize(
    "argv",
    [
        ["interpret", "s3", "--runs", "r", "--output-dir", "o"],
        ["export", "--dataset", "d.h5", "--runs", "r", "--output", "o"],
    ],
)
def test_selection_defaults_to_geo_va_and_rejects_other_splits(argv, capsys):
    parser = cli.build_parser()
    assert parser.parse_args(argv).selection == "geo-va"
    assert parser.parse_args(argv + ["--selection", "1000g-va"]).selection == "1000g-va"
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--selection", "geo-te"])
    assert "invalid choice" in capsys.readouterr().err
