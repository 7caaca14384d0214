"""The test oracles themselves: a missing or broken oracle must fail the suite, not skip the tests it guards.

cmapPy is the independent GCTX implementation that tests/test_io.py and tests/test_demo.py compare dgex's
files with; it is pinned in envs/requirements.txt (numpy<2 / pandas<3 keep it working).
"""

from __future__ import annotations

import importlib.metadata
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REQUIREMENTS = Path(__file__).resolve().parents[1] / "envs" / "requirements.txt"
INSTALL = "install the pinned environment: pip install -r envs/requirements.txt (or make install)"


def test_cmappy_is_installed_at_the_pinned_version():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", REQUIREMENTS.read_text(), flags=re.M))
    assert "cmapPy" in pins, f"{REQUIREMENTS} no longer pins cmapPy, the GCTX oracle of the tests"
    try:
        have = importlib.metadata.version("cmapPy")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"cmapPy (the GCTX oracle of test_io/test_demo) is not installed; {INSTALL}")
    assert have == pins["cmapPy"], f"cmapPy {have} installed, {pins['cmapPy']} pinned; {INSTALL}"


def test_cmappy_works_in_this_environment(tmp_path):
    """cmapPy's own write/read round trip: breaks (e.g. under numpy 2) before it could vouch for dgex's files."""
    try:
        from cmapPy.pandasGEXpress.GCToo import GCToo
        from cmapPy.pandasGEXpress.parse import parse
        from cmapPy.pandasGEXpress.write_gctx import write
    except ImportError as exc:
        pytest.fail(f"cmapPy cannot be imported ({exc}); {INSTALL}")
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        rng.normal(size=(4, 3)).astype(np.float32),
        index=pd.Index([f"g{i}" for i in range(4)], name="rid"),
        columns=pd.Index([f"s{i}" for i in range(3)], name="cid"),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write(GCToo(data_df=df), str(tmp_path / "x.gctx"))
        back = parse(str(tmp_path / "x.gctx")).data_df
    np.testing.assert_array_equal(back.to_numpy(), df.to_numpy())
    assert list(back.index) == list(df.index) and list(back.columns) == list(df.columns)
