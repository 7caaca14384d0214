"""The red-team sweep (tests/redteam/sweep.py): bad inputs and faults against every verb and the workflow.

``test_redteam_sweep`` runs the sweep's ``--smoke`` subset (28 cases: every
item of issue 11 plus the main fault classes, about 3 minutes on 2 cores) and
fails if any case fails.  ``DGEX_REDTEAM=full`` runs every case instead (about
340 cases, see README "Red-team sweep" for the time); ``DGEX_REDTEAM_STRICT=1``
counts cases marked ``xfail`` as failures (no case is marked any more: every
issue-11 case passes).  The judge's own tests below are fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "redteam"))

from fixtures import Case, Result
from sweep import judge


class _Ctx:
    logs_dirs: list = []


def _case(expect="error", **kw):
    return Case("verb", "name", "cls", expect, body=None, **kw)


def _res(rc, stderr="", stdout=""):
    return Result(["dgex"], rc, stdout, stderr, 0.1)


TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1\nOSError: [Errno 28] No space left on device\n'


@pytest.mark.parametrize(
    "expect, res, failure",
    [
        ("error", _res(2, "12:00 INFO x\ndgex: error: x.gctx: empty file; regenerate it\n"), ""),
        ("error", _res(2, "usage: dgex train ...\ndgex train: error: argument --lr: must be > 0\n"), ""),
        ("error", _res(1, TRACEBACK), "traceback"),
        ("error", _res(-11, "Fatal Python error: Segmentation fault\n"), "signal"),
        ("error", _res(139, ""), "signal"),
        ("error", _res(0, "12:00 INFO wrote out.h5\n"), "exit0-wrong"),
        ("error", _res(2, "dgex: error: one\ndgex: error: two\n"), "bad-error"),
        ("error", _res(2, "dgex: error: one\n12:00 INFO after\n"), "bad-error"),
        ("error", _res(1, "dgex: error: one\n"), "bad-error"),
        ("ok", _res(2, "dgex: error: refused\n"), "refused"),
        ("warn-ok", _res(0, "12:00 INFO no warning\n"), "exit0-wrong"),
        ("warn-ok", _res(0, "12:00 WARNING dgex.x: 5 landmarks missing\n"), ""),
    ],
)
def test_judge_classifies_outcomes(expect, res, failure):
    case = _case(expect, warn="missing" if expect == "warn-ok" else None)
    assert judge(case, _Ctx(), res)[0] == failure


def test_judge_checks_message_and_oracle():
    assert judge(_case(msg=("nope.h5",)), _Ctx(), _res(2, "dgex: error: x.h5: not found\n"))[0] == "bad-error"
    assert judge(_case(msg=("NOPE.h5",)), _Ctx(), _res(2, "dgex: error: nope.h5: not found\n"))[0] == ""
    wrong = _case("ok", check=lambda ctx, res: "values differ")
    assert judge(wrong, _Ctx(), _res(0, ""))[0] == "oracle"
    assert judge(_case("ok", check=lambda ctx, res: None), _Ctx(), _res(0, ""))[0] == ""


def test_every_case_is_well_formed():
    from cases import CASES, SMOKE

    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 100
    assert {c.expect for c in CASES} <= {"error", "ok", "warn-ok", "reject", "wf-fail", "wf-ok"}
    assert all(c.check for c in CASES if c.expect in ("ok", "wf-ok", "warn-ok"))  # success needs an oracle
    assert {c.verb for c in CASES} >= {
        "demo-data", "acquire", "preprocess", "train", "baseline", "aggregate", "tables",
        "figures", "interpret", "export", "infer", "gpus", "workflow",
    }  # fmt: skip
    assert set(ids) >= SMOKE
    assert not [c.id for c in CASES if c.xfail], "every issue-11 case passes now: a new known failure needs a fix"


@pytest.mark.slow
def test_redteam_sweep(tmp_path):
    report = tmp_path / "sweep.json"
    args = [sys.executable, str(REPO / "tests" / "redteam" / "sweep.py"), "--tmp", str(tmp_path), "--json", str(report)]
    if os.environ.get("DGEX_REDTEAM") != "full":
        args.append("--smoke")
    if os.environ.get("DGEX_REDTEAM_STRICT"):
        args.append("--no-xfail")
    res = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    table = res.stdout[res.stdout.find("\ncase ") :] + res.stderr[-2000:]
    assert report.is_file(), table
    outcomes = json.loads(report.read_text())["outcomes"]
    failed = [f"{o['id']}: {o['failure']}: {o['detail'] or o['message']}" for o in outcomes if o["verdict"] == "FAIL"]
    assert not failed and res.returncode == 0, "\n".join(failed) + "\n" + table
    assert sum(o["verdict"] != "skip" for o in outcomes) >= 20, table  # a sweep that runs nothing proves nothing
