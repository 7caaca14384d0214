#!/usr/bin/env python
"""Red-team sweep: bad inputs and faults against every `dgex` verb and the Snakemake workflow.

Each case runs real commands (``python -m dgex ...`` / ``python -m snakemake ...``)
as subprocesses in a fresh temporary folder, with a timeout, and declares what
must happen:

* ``error``   exit status 2, exactly one ``dgex: error:`` line and it is the last
              line of stderr (argparse's ``dgex <verb>: error:`` counts too),
              no ``Traceback``, no death by a signal;
* ``ok``      exit status 0 and the case's oracle accepts the result;
* ``warn-ok`` exit status 0, a logged WARNING matching the case's pattern, and
              the oracle accepts the result;
* ``reject``  either of ``error`` or ``warn-ok`` (where the issue allows both);
* ``wf-fail`` the workflow exits non-zero, and either a failed job's log ends in
              the ``dgex: error:`` line or Snakemake's message names the key/path;
              no ``Traceback`` in any job log;
* ``wf-ok``   the workflow exits 0 and the oracle accepts the result.

After every case the folder is searched for leftovers (``*.tmp``, ``*.work.h5``,
hidden ``.*.old``) and, when the command failed, for the outputs it must not
have left.  Usage::

    python tests/redteam/sweep.py                 # every case
    python tests/redteam/sweep.py --fast          # the quick subset (no workflow runs, no kills)
    python tests/redteam/sweep.py -k infer --keep # cases whose id contains "infer", keep the folders
    python tests/redteam/sweep.py --list

Exit status: 0 when no case failed (expected failures marked ``xfail`` do not
count unless ``--no-xfail``), 1 otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from fixtures import REPO, Case, FixtureError, Fixtures, Result, Skip, dgex, run

EXPECTATIONS = ("error", "ok", "warn-ok", "reject", "wf-fail", "wf-ok")
#: the one-line error: `dgex: error: ...` (argparse: `dgex <verb> [<analysis>]: error: ...`)
ERROR_LINE = re.compile(r"^dgex(?: [\w-]+)*: error: ")
WARNING_LINE = re.compile(r"\bWARNING\b")
#: temporary or half-written files that must never outlive a command
LEFTOVER = re.compile(r"(\.tmp($|[.\-_~]))|(\.work\.h5$)|(^\..+\.old$)")


@dataclass
class Outcome:
    case: Case
    verdict: str  # pass, FAIL, xfail, XPASS, skip
    failure: str = ""  # traceback, signal, exit0-wrong, bad-error, refused, leftover, oracle, timeout, case-bug
    rc: int | None = None
    message: str = ""
    detail: str = ""
    seconds: float = 0.0
    folder: str = ""


class Ctx:
    """What a case body works with: its own folder, the fixtures, command runners, mounts."""

    def __init__(self, case: Case, folder: Path, fx: Fixtures):
        self.case, self.dir, self.fx = case, folder, fx
        self.mounts: list[Path] = []
        self.notes: list[str] = []
        self.logs_dirs: list[Path] = []  # where wf cases' job logs live

    # -- paths
    def p(self, *parts) -> Path:
        return self.dir.joinpath(*parts)

    def f(self, *parts) -> Path:
        """A fixture path (never modify it: copy first); ``"runs/1x8_d0/part0"`` and ``"runs", "1x8_d0", ...``
        alike, so that the fixture is built whichever form a case uses."""
        return self.fx.p(*(q for part in parts for q in Path(part).parts))

    def copy(self, fixture: str, dst: str | None = None) -> Path:
        src, out = self.f(*Path(fixture).parts), self.p(dst or Path(fixture).name)  # parts: builds it if needed
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, out, symlinks=True)
        else:
            shutil.copy2(src, out)
        return out

    # -- commands
    def dgex(self, *args, env=None, timeout=None, prefix=None) -> Result:
        return dgex(*args, cwd=self.dir, env=env, timeout=timeout or self.case.timeout, prefix=prefix)

    def smk(self, *args, timeout=None) -> Result:
        return run(
            [sys.executable, "-m", "snakemake", "--cores", "1", *args], REPO, timeout=timeout or self.case.timeout
        )

    # -- storage faults
    def tmpfs(self, name: str, size: str = "1m", leave: int | None = None, ro: bool = False) -> Path:
        """Mount a tmpfs at ``name`` (read-only with ``ro``; filled up to ``leave`` free bytes)."""
        if os.geteuid() != 0 or not shutil.which("mount"):
            raise Skip("mounting a tmpfs needs root")
        path = self.p(name)
        path.mkdir(parents=True, exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            raise Skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
        self.mounts.append(path)
        _MOUNTS.add(path)
        if leave is not None:
            _fill(path, leave)
        return path

    def unwritable(self, name: str) -> tuple[Path, list]:
        """A folder this case's commands cannot write to, and the command prefix that makes it so.

        As root (who may write anywhere) the commands run without CAP_DAC_OVERRIDE via setpriv.
        """
        path = self.p(name)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        if os.geteuid() != 0:
            return path, []
        if not shutil.which("setpriv"):
            raise Skip("running as root without setpriv: cannot make a folder unwritable")
        return path, ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]

    def cleanup_mounts(self) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
            _MOUNTS.discard(m)
        self.mounts.clear()


_MOUNTS: set[Path] = set()
FILLER = "filler.bin"


@atexit.register
def _unmount_all():
    for m in list(_MOUNTS):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` until only about ``leave`` bytes are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / FILLER, "wb") as fh:
        todo = max(0, free - leave)
        while todo > 0:
            n = min(todo, 1 << 20)
            try:
                fh.write(b"\0" * n)
                fh.flush()
            except OSError:
                break
            todo -= n


# --------------------------------------------------------------------------- #
# judging
# --------------------------------------------------------------------------- #
def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in _lines(stderr) if ERROR_LINE.match(ln)]


def _has_fragments(text: str, fragments) -> list[str]:
    low = text.lower()
    return [f for f in fragments if f.lower() not in low]


def _leftovers(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".snakemake"]
        for name in dirs + files:
            if LEFTOVER.search(name):
                found.append(str(Path(root, name).relative_to(folder)))
    return sorted(found)


def _files_in(path: Path) -> list[str]:
    """Files at or under ``path`` (the filler of a full tmpfs is the case's own, not an output)."""
    if path.is_file() or path.is_symlink():
        return [str(path)]
    if path.is_dir():
        return [str(p) for p in path.rglob("*") if p.is_file() and p.name != FILLER]
    return []


def _wf_logs(ctx: Ctx) -> dict[str, str]:
    logs = {}
    for d in ctx.logs_dirs:
        for p in Path(d).rglob("*.log"):
            with contextlib.suppress(OSError):
                logs[str(p)] = p.read_text(errors="replace")
    return logs


def judge(case: Case, ctx: Ctx, res: Result) -> tuple[str, str, str]:
    """``(failure class or '', first line of the message, detail)`` for a finished case."""
    err = res.stderr or ""
    elines = _error_lines(err)
    message = elines[0] if elines else (_lines(err)[-1] if _lines(err) else "")
    if res.timed_out and res.rc is not None and res.rc < 0 and "kill trigger never fired" not in err:
        return "timeout", message, f"no result within {case.timeout:g} s"
    if res.rc is not None and (res.rc < 0 or res.rc >= 128):
        return "signal", message, f"died by a signal (exit {res.rc})"
    if case.expect.startswith("wf-"):
        logs = _wf_logs(ctx)
        tb = [p for p, t in logs.items() if "Traceback" in t]
        if tb or "Traceback (most recent call last)" in err:
            return "traceback", message, "Traceback in " + (tb[0] if tb else "snakemake's output")
        if case.expect == "wf-fail":
            if res.rc == 0:
                return "exit0-wrong", message, "the workflow succeeded but should have failed"
            job_errors = {p: _error_lines(t) for p, t in logs.items()}
            job_errors = {p: e for p, e in job_errors.items() if e}
            for p, e in job_errors.items():
                last = _lines(logs[p])[-1]
                if len(e) != 1 or last != e[0]:
                    return "bad-error", e[0], f"{p}: the dgex error line is not the only/last line"
            named = case.msg and not _has_fragments(res.stdout + err, case.msg)
            if job_errors:
                message = next(iter(job_errors.values()))[0]
            if not job_errors and not named:
                return "bad-error", message, f"no dgex error in a job log and the message does not name {case.msg}"
            if job_errors and case.msg and not named:
                miss = _has_fragments(" ".join(e[0] for e in job_errors.values()) + res.stdout + err, case.msg)
                if miss:
                    return "bad-error", message, f"message lacks {miss}"
            return "", message, ""
        if res.rc != 0:
            return "refused", message, f"workflow failed (exit {res.rc}): {_wf_failure(res)}"
        bad = case.check(ctx, res) if case.check else None
        return ("oracle", message, bad) if bad else ("", message, "")
    if "Traceback (most recent call last)" in err:
        return "traceback", _traceback_summary(err) or message, "Traceback on stderr"
    warned = [ln for ln in _lines(err) if WARNING_LINE.search(ln)]
    if case.expect in ("error", "reject") and res.rc != 0:
        if res.rc != 2:
            return "bad-error", message, f"exit status {res.rc}, expected 2"
        if len(elines) != 1:
            return "bad-error", message, f"{len(elines)} 'dgex: error:' lines, expected exactly 1"
        if _lines(err)[-1] != elines[0]:
            return "bad-error", message, "the error line is not the last line of stderr"
        miss = _has_fragments(elines[0], case.msg)
        if miss:
            return "bad-error", message, f"error line lacks {miss}"
        bad = case.check(ctx, res) if (case.check and case.expect == "error") else None
        return ("oracle", message, bad) if bad else ("", message, "")
    if case.expect == "error":
        return "exit0-wrong", _last_log(err), "exit 0: the bad input was accepted"
    if res.rc != 0:
        return "refused", message, f"exit {res.rc} where success was expected: {_tail(err)}"
    if case.expect in ("warn-ok", "reject"):
        pattern = re.compile(case.warn or ".", re.IGNORECASE)
        if not any(pattern.search(w) for w in warned):
            what = "exit 0 without a warning" if not warned else f"no warning matches /{case.warn}/"
            return "exit0-wrong", _last_log(err), what
        message = next(w for w in warned if pattern.search(w))
    bad = case.check(ctx, res) if case.check else None
    return (
        ("oracle" if case.expect == "ok" else "exit0-wrong", message, bad)
        if bad
        else ("", message or _last_log(err), "")
    )


def _wf_failure(res: Result) -> str:
    """The lines of Snakemake's output that say why it failed (failed rule, dgex error, exception)."""
    lines = _lines(res.stdout + "\n" + res.stderr)
    keep = [
        ln.strip()
        for ln in lines
        if ln.startswith(("Error in rule", "dgex: error:", "LockException", "MissingInputException"))
        or re.match(r"^\w+(Error|Exception)\b", ln.strip())
        or "cannot be locked" in ln
    ]
    return " | ".join(dict.fromkeys(keep))[:600] or _tail(res.stderr)


def _tail(text: str, n: int = 300) -> str:
    return " | ".join(_lines(text)[-3:])[-n:]


def _last_log(text: str) -> str:
    lines = _lines(text)
    return lines[-1] if lines else ""


def _traceback_summary(err: str) -> str:
    lines = _lines(err)
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", lines[i]) or re.match(r"^[\w.]+: ", lines[i]):
            return lines[i]
    return ""


def run_case(case: Case, fx: Fixtures, base: Path, keep: bool, honour_xfail: bool) -> Outcome:
    folder = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "_", case.id) + "-", dir=base))
    ctx = Ctx(case, folder, fx)
    t0 = time.time()
    res = None
    try:
        res = case.body(ctx)
        failure, message, detail = judge(case, ctx, res)
        if not failure:
            left = _leftovers(folder)
            if left:
                failure, detail = "leftover", "left behind: " + ", ".join(left[:5])
        if not failure and res.rc != 0:
            stale = [f for o in case.outputs for f in _files_in(ctx.p(o))]
            if stale:
                failure, detail = (
                    "leftover",
                    "failed but left output: " + ", ".join(str(Path(s).relative_to(folder)) for s in stale[:5]),
                )
    except Skip as exc:
        ctx.cleanup_mounts()
        _rm(folder, keep)
        return Outcome(case, "skip", message=str(exc), seconds=time.time() - t0)
    except Exception as exc:  # a bug of the case itself, reported, never hidden
        failure, message = "case-bug", f"{type(exc).__name__}: {exc}"
        detail = traceback.format_exc(limit=4)
    finally:
        ctx.cleanup_mounts()
    seconds = time.time() - t0
    rc = res.rc if res is not None else None
    if failure:
        verdict = "xfail" if (case.xfail and honour_xfail) else "FAIL"
    else:
        verdict = "XPASS" if (case.xfail and honour_xfail) else "pass"
    out = Outcome(case, verdict, failure, rc, message.strip(), detail, seconds, str(folder) if keep else "")
    _rm(folder, keep)
    return out


def _rm(folder: Path, keep: bool) -> None:
    if keep:
        return
    for p in sorted(folder.rglob("*"), reverse=True):  # read-only folders made by the case
        try:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o755)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- #
# the command line
# --------------------------------------------------------------------------- #
def select(cases, patterns, fast, smoke=False):
    out = []
    for c in cases:
        if fast and c.slow:
            continue
        if smoke and not c.smoke:
            continue
        if patterns and not any(p in c.id or fnmatch.fnmatch(c.id, p) or p == c.cls for p in patterns):
            continue
        out.append(c)
    return out


def print_table(outcomes, stream=sys.stdout):
    w_id = max([len(o.case.id) for o in outcomes] + [4])
    head = f"{'case':<{w_id}}  {'expect':<7}  {'rc':>4}  {'verdict':<7}  {'failure':<11}  message"
    print(head, file=stream)
    print("-" * len(head), file=stream)
    for o in outcomes:
        rc = "" if o.rc is None else str(o.rc)
        msg = o.message if len(o.message) <= 110 else o.message[:107] + "..."
        print(
            f"{o.case.id:<{w_id}}  {o.case.expect:<7}  {rc:>4}  {o.verdict:<7}  {o.failure:<11}  {msg}",
            file=stream,
        )
        if o.verdict in ("FAIL", "xfail", "XPASS") and o.detail:
            for line in o.detail.strip().splitlines()[:6]:
                print(f"{'':<{w_id}}      {line[:160]}", file=stream)
        if o.verdict == "xfail":
            print(f"{'':<{w_id}}      xfail: {o.case.xfail}", file=stream)


def summary(outcomes) -> dict:
    verdicts = Counter(o.verdict for o in outcomes)
    by_class = defaultdict(Counter)
    for o in outcomes:
        by_class[o.case.cls][o.verdict] += 1
    return {
        "tried": sum(v for k, v in verdicts.items() if k != "skip"),
        "verdicts": dict(verdicts),
        "failures": dict(Counter(o.failure for o in outcomes if o.verdict in ("FAIL", "xfail"))),
        "by_class": {k: dict(v) for k, v in sorted(by_class.items())},
        "verbs": sorted({o.case.verb for o in outcomes}),
    }


def main(argv=None) -> int:
    from cases import CASES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("-k", action="append", default=[], metavar="PATTERN", help="run cases whose id contains PATTERN")
    ap.add_argument("--fast", action="store_true", help="skip slow cases (workflow runs, kills, big inputs)")
    ap.add_argument(
        "--smoke", action="store_true", help="only the quick subset (one or two cases per fault class and issue item)"
    )
    ap.add_argument("--jobs", type=int, default=1, help="cases run in parallel (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep each case's temporary folder")
    ap.add_argument("--tmp", default=None, help="folder for the fixtures and case folders (default: a new temp dir)")
    ap.add_argument(
        "--reuse-fixtures",
        action="store_true",
        help="with --tmp: reuse the fixture files an earlier sweep left there (for developing cases)",
    )
    ap.add_argument("--no-xfail", action="store_true", help="count known failures (xfail) as failures")
    ap.add_argument("--json", default=None, help="write the outcomes as JSON here")
    args = ap.parse_args(argv)

    ids = [c.id for c in CASES]
    dup = [i for i, n in Counter(ids).items() if n > 1]
    if dup:
        raise SystemExit(f"duplicate case ids: {dup}")
    cases = select(CASES, args.k, args.fast, args.smoke)
    if args.list:
        for c in cases:
            flags = (" slow" if c.slow else "") + (" xfail" if c.xfail else "")
            print(f"{c.id:<55} {c.cls:<18} {c.expect:<8}{flags}")
        print(f"{len(cases)} cases")
        return 0

    base = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="dgex-redteam-"))
    base.mkdir(parents=True, exist_ok=True)
    fx = Fixtures(base / "fixtures", reuse=args.reuse_fixtures)
    t0 = time.time()
    try:
        if not (args.k or args.smoke):  # a selection builds only the fixtures its cases ask for
            fx.build(log=lambda m: print(m, flush=True))
    except FixtureError as exc:
        print(f"sweep: cannot build the fixtures: {exc}", file=sys.stderr)
        return 2
    cases_dir = base / "cases"
    cases_dir.mkdir(exist_ok=True)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(c):
        o = run_case(c, fx, cases_dir, args.keep, not args.no_xfail)
        with lock:
            outcomes.append(o)
            print(f"[{len(outcomes):>3}/{len(cases)}] {o.verdict:<5} {c.id} ({o.seconds:.1f} s)", flush=True)
        return o

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(one, cases))
    order = {c.id: i for i, c in enumerate(cases)}
    outcomes.sort(key=lambda o: order[o.case.id])
    print()
    print_table(outcomes)
    s = summary(outcomes)
    wall = time.time() - t0
    print()
    print(
        f"tried {s['tried']} cases ({len(outcomes)} selected) over {len(s['verbs'])} verbs in {wall:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(s["verdicts"].items()))
    )
    if s["failures"]:
        print("failures by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(s["failures"].items())))
    print("by class:")
    for cls, counts in s["by_class"].items():
        print(f"  {cls:<20} " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    skipped = [o for o in outcomes if o.verdict == "skip"]
    for o in skipped:
        print(f"skipped {o.case.id}: {o.message}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "summary": s,
                    "seconds": wall,
                    "outcomes": [
                        {
                            "id": o.case.id,
                            "verb": o.case.verb,
                            "class": o.case.cls,
                            "expect": o.case.expect,
                            "verdict": o.verdict,
                            "failure": o.failure,
                            "rc": o.rc,
                            "message": o.message,
                            "detail": o.detail,
                            "xfail": o.case.xfail,
                            "seconds": round(o.seconds, 2),
                        }
                        for o in outcomes
                    ],
                },
                indent=1,
            )
        )
    if not args.keep and not args.tmp:
        shutil.rmtree(base, ignore_errors=True)
    return 1 if any(o.verdict == "FAIL" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
