"""The red-team cases: bad inputs and faults for every `dgex` verb and the workflow.

Each ``add(verb, name, class, expectation, body, ...)`` registers one case;
``body(ctx)`` prepares damaged inputs in ``ctx.dir`` (copies of the fixtures,
never the fixtures themselves) and returns the Result of the command under
test.  See sweep.py for what each expectation requires.  ``xfail=`` marks a
known failure, quoting what is wrong; every issue-11 case now passes, so none
is marked (a mark on a case that passes is reported as XPASS).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import threading
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import yaml
from fixtures import (
    PRE_ARGS,
    PY,
    REPO,
    Case,
    Skip,
    adjusted_r2,
    bundle_landmarks,
    bundle_targets,
    copy_gctx_modified,
    glob_exists,
    lstsq_predict,
    numpy_predict,
    read_gctx,
    run_killed,
    run_paused,
    same_h5,
    train_argv,
    write_table,
)

CASES: list[Case] = []


def add(verb, name, cls, expect, body, **kw) -> None:
    CASES.append(Case(verb, name, cls, expect, body, **kw))


DEAD_PID = 99999999  # no process has this pid: files named with it belong to a dead run
INF = ["--device", "cpu", "--no-progress"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def touch_file(path: Path, content: bytes = b"not a folder\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def garbage(path: Path, n: int = 4096, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def truncate_copy(src: Path, dst: Path, keep: float = 0.5) -> Path:
    """A copy of ``src`` cut to a fraction (float) or a number of bytes (int)."""
    data = Path(src).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:n])
    return dst


def unchanged(path: str):
    """An oracle for refused commands: ``path`` still holds what it held before (checked via a stored hash)."""

    def check(ctx, res):
        want = getattr(ctx, "_hash", {}).get(path)
        got = _tree_hash(ctx.p(path))
        return None if want == got else f"{path} was modified although the command failed"

    return check


def remember(ctx, path: str) -> None:
    ctx._hash = getattr(ctx, "_hash", {})
    ctx._hash[path] = _tree_hash(ctx.p(path))


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
    else:
        h.update(b"<absent>")
    return h.hexdigest()


def ok_files(*paths):
    """An oracle: the files exist and are not empty."""

    def check(ctx, res):
        missing = [p for p in paths if not ctx.p(p).is_file() or ctx.p(p).stat().st_size == 0]
        return f"missing or empty outputs: {missing}" if missing else None

    return check


def all_checks(*checks):
    def check(ctx, res):
        for c in checks:
            bad = c(ctx, res)
            if bad:
                return bad
        return None

    return check


def demo_geo(ctx):
    """``(data (n_samples, n_probes), probe ids, sample ids)`` of the fixture GEO input."""
    return read_gctx(ctx.f("demo", "geo.gctx"))


def geo_variant(ctx, name="geo.gctx", fn=None, **kw) -> Path:
    data, rows, cols = demo_geo(ctx)
    data = data.astype(np.float64)
    rows, cols = list(rows), list(cols)
    if fn is not None:
        data, rows, cols = fn(data, rows, cols)
    out = ctx.p(name)
    copy_gctx_modified(ctx.f("demo", "geo.gctx"), out, data=data, rows=rows, cols=cols, **kw)
    return out


def pre(ctx, geo, *extra, out="out/ds.h5", rna=False):
    args = ["preprocess", "--geo", geo, *PRE_ARGS, "--output", out, *extra]
    if rna:
        args += ["--g1000", ctx.f("demo", "1000g.tsv.gz"), "--gtex", ctx.f("demo", "gtex.gctx")]
    return ctx.dgex(*args)


def same_dataset(out, ref, atol=1e-6, skip=()):
    def check(ctx, res):
        return same_h5(ctx.p(out), ctx.f(ref) if not Path(ref).is_absolute() else ref, atol=atol, skip=skip)

    return check


PRE_OUT = ("out/ds.h5", "out/ds.json")


def g1000_table(ctx):
    return pd.read_csv(ctx.f("demo", "1000g.tsv.gz"), sep="\t")


def write_g1000(ctx, df, name="g1000.tsv"):
    path = ctx.p(name)
    df.to_csv(path, sep="\t", index=False)
    return path


# --------------------------------------------------------------------------- #
# demo-data
# --------------------------------------------------------------------------- #
DEMO = ["--n-geo", "60", "--n-duplicates", "4", "--n-1000g", "12", "--n-gtex", "12", "--n-latent", "3"]
DEMO += ["--max-targets", "20"]
DEMO_OUT = ("out/geo.gctx", "out/1000g.tsv.gz", "out/gtex.gctx", "out/demo.json")

add("demo-data", "n-geo-zero", "bad-number", "error", lambda c: c.dgex("demo-data", "--output-dir", "out", "--n-geo", "0"), msg=("n-geo",), outputs=("out",))  # fmt: skip
add("demo-data", "noise-nan", "bad-number", "error", lambda c: c.dgex("demo-data", "--output-dir", "out", "--noise", "nan"), msg=("noise",), outputs=("out",))  # fmt: skip
add("demo-data", "noise-inf", "bad-number", "error", lambda c: c.dgex("demo-data", "--output-dir", "out", *DEMO, "--noise", "inf"), msg=("noise",), outputs=("out",))  # fmt: skip
add("demo-data", "seed-negative", "bad-number", "error", lambda c: c.dgex("demo-data", "--output-dir", "out", *DEMO, "--seed", "-1"), msg=("seed",), outputs=("out",))  # fmt: skip
add("demo-data", "duplicates-exceed-profiles", "bad-number", "error", lambda c: c.dgex("demo-data", "--output-dir", "out", "--n-geo", "5", "--n-duplicates", "9"), msg=("n_duplicates",), outputs=("out",))  # fmt: skip


def _demo_output_is_file(c):
    touch_file(c.p("out"))
    remember(c, "out")
    return c.dgex("demo-data", "--output-dir", "out", *DEMO)


add("demo-data", "output-dir-is-a-file", "unwritable-output", "error", _demo_output_is_file, msg=("out",), check=unchanged("out"))  # fmt: skip


def _demo_readonly(c):
    c.tmpfs("out", ro=True)
    return c.dgex("demo-data", "--output-dir", "out", *DEMO)


add("demo-data", "read-only-filesystem", "unwritable-output", "error", _demo_readonly, msg=("out",))


def _demo_full(c):
    c.tmpfs("out", size="256k", leave=4096)
    return c.dgex("demo-data", "--output-dir", "out", *DEMO)


add("demo-data", "disk-full", "disk-full", "error", _demo_full, msg=("out",), outputs=DEMO_OUT)


def _demo_existing(c):
    for name in ("geo.gctx", "demo.json"):
        garbage(c.p("out", name))
    return c.dgex("demo-data", "--output-dir", "out", *DEMO)


def _same_gctx(out, ref):
    def check(ctx, res):
        a, ra, ca = read_gctx(ctx.p(out))
        b, rb, cb = read_gctx(ref(ctx) if callable(ref) else ctx.f(ref))
        if ra != rb or ca != cb or a.shape != b.shape or not np.array_equal(a, b):
            return f"{out} differs from a fresh run with the same arguments"
        return None

    return check


add("demo-data", "replaces-stale-outputs", "existing-output", "ok", _demo_existing, check=_same_gctx("out/geo.gctx", "demo/geo.gctx"))  # fmt: skip

BIG_DEMO = ["--n-geo", "4000", "--n-duplicates", "10", "--n-1000g", "12", "--n-gtex", "12", "--n-latent", "3"]
BIG_DEMO += ["--max-targets", "20"]


def _demo_killed(sig):
    def body(c):
        c.fx.big_demo()
        args = ["demo-data", "--output-dir", "out", *BIG_DEMO]
        first = run_paused(args, c.dir, "h5write:2", sig=sig)  # the first GCTX output is being filled
        _killed_leaving(c, first, sig, ".*.tmp")
        return c.dgex(*args)

    return body


add("demo-data", "sigkill-then-rerun", "kill-rerun", "ok", _demo_killed(signal.SIGKILL), check=_same_gctx("out/geo.gctx", lambda c: c.fx.big_demo() / "geo.gctx"), slow=True)  # fmt: skip


# --------------------------------------------------------------------------- #
# acquire
# --------------------------------------------------------------------------- #
def _src(c) -> Path:
    return c.f("demo", "demo.json")


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _acquire_ok(c):
    return c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--sha256", _sha(_src(c)), "--no-progress")  # fmt: skip


def _acquire_check(ctx, res):
    got = ctx.p("dl", "demo.json")
    if not got.is_file() or got.read_bytes() != _src(ctx).read_bytes():
        return "downloaded file differs from the source"
    side = ctx.p("dl", "demo.json.sha256")
    if not side.is_file() or _sha(_src(ctx)) not in side.read_text():
        return "no correct <file>.sha256 sidecar"
    return None


add("acquire", "file-url-verified", "ok-path", "ok", _acquire_ok, check=_acquire_check)
add("acquire", "plain-path-verified", "ok-path", "ok", lambda c: c.dgex("acquire", "--url", _src(c), "--output", "dl/demo.json", "--sha256", _sha(_src(c)), "--no-progress"), check=_acquire_check)  # fmt: skip
add("acquire", "source-missing", "missing-file", "error", lambda c: c.dgex("acquire", "--url", "file:///nonexistent/x.gctx", "--output", "dl/x.gctx", "--no-progress"), msg=("not found",), outputs=("dl",))  # fmt: skip
add("acquire", "source-is-directory", "wrong-format", "error", lambda c: c.dgex("acquire", "--url", c.f("demo").as_uri(), "--output", "dl/x", "--no-progress"), outputs=("dl",))  # fmt: skip
add("acquire", "unsupported-scheme", "bad-config", "error", lambda c: c.dgex("acquire", "--url", "ftp://example.org/x.gctx", "--output", "dl/x.gctx", "--no-progress"), msg=("scheme",), outputs=("dl",))  # fmt: skip
add("acquire", "url-without-host", "bad-config", "error", lambda c: c.dgex("acquire", "--url", "http:///x.gctx", "--output", "dl/x.gctx", "--no-progress"), msg=("host",), outputs=("dl",))  # fmt: skip
add("acquire", "sha256-mismatch", "corrupt-file", "error", lambda c: c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--sha256", "0" * 64, "--no-progress"), msg=("sha256",), outputs=("dl/demo.json",))  # fmt: skip
add("acquire", "sha256-malformed", "bad-config", "error", lambda c: c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--sha256", "xyz", "--no-progress"), msg=("sha256",), outputs=("dl",))  # fmt: skip
add("acquire", "size-mismatch", "corrupt-file", "error", lambda c: c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--size", "3", "--no-progress"), msg=("bytes",), outputs=("dl/demo.json",))  # fmt: skip
add("acquire", "timeout-zero", "bad-number", "error", lambda c: c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/x", "--timeout", "0"), msg=("timeout",), outputs=("dl",))  # fmt: skip


def _acquire_to_dir(c):
    c.p("dl").mkdir()
    return c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl", "--no-progress")


add("acquire", "output-is-a-directory", "unwritable-output", "error", _acquire_to_dir, msg=("directory",))


def _acquire_existing_bad(c):
    garbage(c.p("dl", "demo.json"), 100)
    remember(c, "dl/demo.json")
    return c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--sha256", _sha(_src(c)), "--no-progress")  # fmt: skip


add("acquire", "existing-output-fails-verification", "existing-output", "error", _acquire_existing_bad, msg=("sha256",), check=unchanged("dl/demo.json"))  # fmt: skip


def _acquire_refused(c):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return c.dgex("acquire", "--url", f"http://127.0.0.1:{port}/x.gctx", "--output", "dl/x.gctx", "--retries", "0", "--timeout", "2", "--no-progress")  # fmt: skip


add("acquire", "connection-refused", "network", "error", _acquire_refused, outputs=("dl/x.gctx",))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def _serve(folder: Path):
    handler = functools.partial(_Quiet, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _acquire_404(c):
    srv = _serve(c.f("demo"))
    try:
        return c.dgex("acquire", "--url", f"http://127.0.0.1:{srv.server_port}/missing.gctx", "--output", "dl/x.gctx", "--retries", "0", "--no-progress")  # fmt: skip
    finally:
        srv.shutdown()


add("acquire", "http-404", "network", "error", _acquire_404, msg=("404",), outputs=("dl/x.gctx",))


def _acquire_http_ok(c):
    srv = _serve(c.f("demo"))
    try:
        return c.dgex("acquire", "--url", f"http://127.0.0.1:{srv.server_port}/demo.json", "--output", "dl/demo.json", "--sha256", _sha(_src(c)), "--no-progress")  # fmt: skip
    finally:
        srv.shutdown()


add("acquire", "http-verified", "ok-path", "ok", _acquire_http_ok, check=_acquire_check)


def _acquire_full(c):
    c.tmpfs("dl", size="64k", leave=4096)
    return c.dgex("acquire", "--url", c.f("demo", "geo.gctx").as_uri(), "--output", "dl/geo.gctx", "--no-progress")


add("acquire", "disk-full", "disk-full", "error", _acquire_full, msg=("dl/geo.gctx",), outputs=("dl/geo.gctx",))


def _acquire_readonly(c):
    c.tmpfs("dl", ro=True)
    return c.dgex("acquire", "--url", _src(c).as_uri(), "--output", "dl/demo.json", "--no-progress")


add("acquire", "read-only-filesystem", "unwritable-output", "error", _acquire_readonly, msg=("dl",))


# --------------------------------------------------------------------------- #
# preprocess: the GEO input
# --------------------------------------------------------------------------- #
add("preprocess", "geo-missing", "missing-file", "error", lambda c: pre(c, "nope.gctx"), msg=("nope.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-empty", "empty-file", "error", lambda c: pre(c, touch_file(c.p("geo.gctx"), b"")), msg=("empty",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-garbage", "corrupt-file", "error", lambda c: pre(c, garbage(c.p("geo.gctx"))), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-truncated-half", "truncated-file", "error", lambda c: pre(c, truncate_copy(c.f("demo", "geo.gctx"), c.p("geo.gctx"), 0.5)), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-truncated-header", "truncated-file", "error", lambda c: pre(c, truncate_copy(c.f("demo", "geo.gctx"), c.p("geo.gctx"), 1500)), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-directory", "wrong-format", "error", lambda c: pre(c, c.f("demo")), msg=("demo",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-text-named-gctx", "wrong-format", "error", lambda c: pre(c, touch_file(c.p("geo.gctx"), b"id\tS1\nx_at\t1.0\n")), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-gctx-named-tsv", "wrong-format", "error", lambda c: pre(c, c.copy("demo/geo.gctx", "geo.tsv")), msg=("geo.tsv",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-gctx-named-csv-gz", "wrong-format", "error", lambda c: pre(c, c.copy("demo/geo.gctx", "geo.csv.gz")), msg=("geo.csv.gz",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-unknown-extension", "wrong-format", "error", lambda c: pre(c, c.copy("demo/geo.gctx", "geo.xlsx")), msg=("geo.xlsx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-transposed", "wrong-orientation", "error", lambda c: pre(c, geo_variant(c, transpose=True)), msg=("orientation",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-ids-do-not-match-matrix", "corrupt-file", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d[:, :-1], r, s))), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip


def _geo_no_matrix(c):
    with h5py.File(c.p("geo.gctx"), "w") as h5:
        h5["0/META/ROW/id"] = np.array([b"a"])
        h5["0/META/COL/id"] = np.array([b"b"])
    return pre(c, c.p("geo.gctx"))


add("preprocess", "geo-hdf5-without-matrix", "wrong-format", "error", _geo_no_matrix, msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-duplicate-probe-ids", "duplicate-ids", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d, r[:-1] + [r[0]], s))), msg=("duplicate",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-duplicate-sample-ids", "duplicate-ids", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d, r, s[:-1] + [s[0]]))), msg=("duplicate",), outputs=PRE_OUT)  # fmt: skip


def _geo_text(c, name, dup_sample=False, dup_probe=False):
    data, rows, cols = demo_geo(c)
    cols = list(cols)
    rows = list(rows)
    if dup_sample:
        cols[-1] = cols[0]
    if dup_probe:
        rows[-1] = rows[0]
    write_table(c.p(name), data, rows, cols)
    return c.p(name)


add("preprocess", "geo-tsv-duplicate-sample-names", "duplicate-ids", "error", lambda c: pre(c, _geo_text(c, "geo.tsv", dup_sample=True)), msg=("duplicate",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-tsv-duplicate-probe-ids", "duplicate-ids", "error", lambda c: pre(c, _geo_text(c, "geo.tsv", dup_probe=True)), msg=("duplicate",), outputs=PRE_OUT)  # fmt: skip


def _set(fn):
    def f(d, r, s):
        d = d.copy()
        fn(d)
        return d, r, s

    return f


add("preprocess", "geo-nan", "nan-inf", "error", lambda c: pre(c, geo_variant(c, fn=_set(lambda d: d.__setitem__((5, 10), np.nan)))), msg=("nan",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-inf", "nan-inf", "error", lambda c: pre(c, geo_variant(c, fn=_set(lambda d: d.__setitem__((7, 3), np.inf)))), msg=("inf",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-minus-inf-last-sample", "nan-inf", "error", lambda c: pre(c, geo_variant(c, fn=_set(lambda d: d.__setitem__((-1, 0), -np.inf)))), msg=("inf",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-linear-scale", "wrong-scale", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (2.0**d, r, s))), msg=("linear",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-z-scores", "wrong-scale", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: ((d - d.mean(0)) / d.std(0), r, s))), msg=("z-score",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-all-zero", "wrong-scale", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d * 0, r, s))), msg=("geo.gctx",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-entrez-rows", "wrong-ids", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d, [str(1000 + i) for i in range(len(r))], s))), msg=("missing",), outputs=PRE_OUT)  # fmt: skip


def _drop_landmark_probe(d, r, s):
    lm = set(_LM_PROBES)
    i = next(i for i, p in enumerate(r) if p in lm)
    return np.delete(d, i, axis=1), r[:i] + r[i + 1 :], s


def _lm_probes_global():
    from dgex.genes import data_path, read_gene_map

    return [p[0] for p in read_gene_map(data_path("map_lm.txt"))["probes"]]


_LM_PROBES = _lm_probes_global()
add("preprocess", "geo-missing-landmark-probe", "wrong-ids", "error", lambda c: pre(c, geo_variant(c, fn=_drop_landmark_probe)), msg=("landmark",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-two-samples", "too-few-samples", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d[:2], r, s[:2]))), msg=("samples",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "geo-four-samples", "too-few-samples", "error", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (d[:4], r, s[:4]))), msg=("profiles",), outputs=PRE_OUT)  # fmt: skip


def _constant_landmark(d, r, s):
    d = d.copy()
    i = next(i for i, p in enumerate(r) if p in set(_LM_PROBES))
    d[:, i] = 7.0
    return d, r, s


add("preprocess", "geo-constant-landmark", "constant-gene", "reject", lambda c: pre(c, geo_variant(c, fn=_constant_landmark)), warn="constant|variance", outputs=PRE_OUT, check=ok_files("out/ds.h5"))  # fmt: skip
add("preprocess", "geo-flat-sample", "flat-sample", "reject", lambda c: pre(c, geo_variant(c, fn=_set(lambda d: d.__setitem__(3, 8.0)))), warn="flat|constant|variance", outputs=PRE_OUT, check=ok_files("out/ds.h5"))  # fmt: skip


def _geo_gct(c):
    from dgex.io import write_gct

    data, rows, cols = demo_geo(c)
    write_gct(c.p("geo.gct"), data, rows, cols)
    return pre(c, c.p("geo.gct"))


add("preprocess", "geo-as-gct-equals-gctx", "ok-path", "ok", _geo_gct, check=same_dataset("out/ds.h5", "ds_geo.h5", atol=1e-3))  # fmt: skip
add("preprocess", "geo-as-tsv-equals-gctx", "ok-path", "ok", lambda c: pre(c, _geo_text(c, "geo.tsv")), check=same_dataset("out/ds.h5", "ds_geo.h5", atol=1e-4))  # fmt: skip
add("preprocess", "geo-linear-with-log2-flag", "wrong-scale", "ok", lambda c: pre(c, geo_variant(c, fn=lambda d, r, s: (2.0**d - 1, r, s)), "--geo-log2"), check=same_dataset("out/ds.h5", "ds_geo.h5", atol=1e-3))  # fmt: skip
add("preprocess", "geo-log2-flag-on-log-data", "wrong-scale", "reject", lambda c: pre(c, c.f("demo", "geo.gctx"), "--geo-log2"), warn="log", outputs=PRE_OUT, check=ok_files("out/ds.h5"))  # fmt: skip
add("preprocess", "geo-same-path-as-output", "unwritable-output", "error", lambda c: pre(c, c.copy("demo/geo.gctx", "out/ds.h5"), out="out/ds.h5"), msg=("ds.h5",))  # fmt: skip


# --------------------------------------------------------------------------- #
# preprocess: RNA-seq inputs
# --------------------------------------------------------------------------- #
def pre_rna(c, g1000=None, gtex=None, *extra):
    args = ["preprocess", "--geo", c.f("demo", "geo.gctx"), *PRE_ARGS, "--output", "out/ds.h5"]
    args += ["--g1000", g1000 or c.f("demo", "1000g.tsv.gz"), "--gtex", gtex or c.f("demo", "gtex.gctx"), *extra]
    return c.dgex(*args)


def _g1000_dup_samples(c):
    df = g1000_table(c)
    samples = [col for col in df.columns if col not in ("TargetID", "Gene_Symbol", "Chr", "Coord")]
    df = df.rename(columns={samples[-1]: samples[0]})
    return pre_rna(c, write_g1000(c, df))


add("preprocess", "g1000-duplicate-sample-names", "duplicate-ids", "error", _g1000_dup_samples, msg=("duplicate",), outputs=PRE_OUT)  # fmt: skip


def _g1000_dup_rows(c):
    df = g1000_table(c)
    df = pd.concat([df, df.iloc[:5]], ignore_index=True)  # exact copies of 5 genes
    return pre_rna(c, write_g1000(c, df))


add("preprocess", "g1000-repeated-gene-rows", "duplicate-ids", "reject", _g1000_dup_rows, warn="repeated|duplicate", outputs=PRE_OUT, check=same_dataset("out/ds.h5", "ds.h5", atol=1e-5))  # fmt: skip
add("preprocess", "g1000-wrong-id-type", "wrong-ids", "error", lambda c: pre_rna(c, None, None, "--g1000-id-type", "symbol"), msg=("missing",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "g1000-probe-id-type", "wrong-ids", "error", lambda c: pre_rna(c, None, None, "--g1000-id-type", "probe"), msg=("probe",), outputs=PRE_OUT)  # fmt: skip


def _g1000_nan(c):
    df = g1000_table(c)
    df.iloc[3, 6] = np.nan
    return pre_rna(c, write_g1000(c, df))


add("preprocess", "g1000-nan", "nan-inf", "error", _g1000_nan, msg=("nan",), outputs=PRE_OUT)


def _g1000_transposed(c):
    df = g1000_table(c).drop(columns=["Gene_Symbol", "Chr", "Coord"]).set_index("TargetID").T
    df.index.name = "sample"
    df.reset_index().to_csv(c.p("g1000.tsv"), sep="\t", index=False)
    return pre_rna(c, c.p("g1000.tsv"))


add("preprocess", "g1000-transposed", "wrong-orientation", "error", _g1000_transposed, msg=("g1000.tsv",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "g1000-header-only", "empty-file", "error", lambda c: pre_rna(c, write_g1000(c, g1000_table(c).iloc[:0])), msg=("g1000.tsv",), outputs=PRE_OUT)  # fmt: skip


def _g1000_drop_landmark(c):
    ds = h5py.File(c.f("ds.h5"), "r")
    first = ds["genes/landmark/ensembl"][0].decode()
    ds.close()
    df = g1000_table(c)
    df = df[~df["TargetID"].str.split(".").str[0].eq(first)]
    return pre_rna(c, write_g1000(c, df))


add("preprocess", "g1000-missing-landmark-gene", "wrong-ids", "error", _g1000_drop_landmark, msg=("missing",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "g1000-garbage-gz", "corrupt-file", "error", lambda c: pre_rna(c, garbage(c.p("g1000.tsv.gz"))), msg=("g1000.tsv.gz",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "gtex-missing", "missing-file", "error", lambda c: pre_rna(c, None, c.p("nope.gctx")), msg=("nope.gctx",), outputs=PRE_OUT)  # fmt: skip


def _gtex_entrez(c):
    _, rows, _ = read_gctx(c.f("demo", "gtex.gctx"))
    with h5py.File(c.f("ds.h5"), "r") as h5:
        ens = [v.decode() for v in h5["genes/landmark/ensembl"][()]] + [v.decode() for v in h5["genes/target/ensembl"][()]]  # fmt: skip
        ent = [v.decode() for v in h5["genes/landmark/entrez"][()]] + [v.decode() for v in h5["genes/target/entrez"][()]]  # fmt: skip
    to_entrez = dict(zip(ens, ent))
    new = [to_entrez.get(r.split(".")[0], r) for r in rows]
    copy_gctx_modified(c.f("demo", "gtex.gctx"), c.p("gtex.gctx"), rows=new)
    return pre_rna(c, None, c.p("gtex.gctx"), "--gtex-id-type", "entrez")


add("preprocess", "gtex-entrez-ids-equal-ensembl", "ok-path", "ok", _gtex_entrez, check=same_dataset("out/ds.h5", "ds.h5", atol=1e-5))  # fmt: skip


# --------------------------------------------------------------------------- #
# preprocess: gene maps and numeric flags
# --------------------------------------------------------------------------- #
add("preprocess", "landmark-map-missing", "missing-file", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--landmarks", "nope.txt"), msg=("nope.txt",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "landmark-map-garbage", "corrupt-file", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--landmarks", garbage(c.p("lm.txt"))), msg=("lm.txt",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "landmark-map-empty", "empty-file", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--landmarks", touch_file(c.p("lm.txt"), b"")), msg=("lm.txt",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "target-map-one-column", "wrong-format", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--targets", touch_file(c.p("tg.txt"), b"GENE1\nGENE2\n")), msg=("tg.txt",), outputs=PRE_OUT)  # fmt: skip


def _dup_landmark_map(c):
    from dgex.genes import data_path

    lines = data_path("map_lm.txt").read_text().splitlines(keepends=True)
    c.p("lm.txt").write_text("".join(lines + lines[:3]))
    return pre(c, c.f("demo", "geo.gctx"), "--landmarks", c.p("lm.txt"))


add("preprocess", "landmark-map-duplicate-genes", "duplicate-ids", "error", _dup_landmark_map, msg=("lm.txt",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "max-targets-beyond-map", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--max-targets", "100000"), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "more-parts-than-targets", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--target-parts", "50"), msg=("parts",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "fractions-sum-above-one", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--va-fraction", "0.6", "--te-fraction", "0.6"), msg=("fraction",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "dedup-threshold-nan", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--dedup-threshold", "nan"), msg=("dedup-threshold",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "dedup-threshold-negative", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--dedup-threshold", "-1"), msg=("dedup-threshold",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "epsilon-inf", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--epsilon", "inf"), msg=("epsilon",), outputs=PRE_OUT)  # fmt: skip
add("preprocess", "chunk-size-zero", "bad-number", "error", lambda c: pre(c, c.f("demo", "geo.gctx"), "--chunk-size", "0"), msg=("chunk-size",), outputs=PRE_OUT)  # fmt: skip


def _chunk_invariance(c):
    a = pre(c, c.f("demo", "geo.gctx"), "--no-dedup", "--chunk-size", "1", out="out/ds.h5")
    if a.rc != 0:
        return a
    b = pre(c, c.f("demo", "geo.gctx"), "--no-dedup", "--chunk-size", "1000000000", out="ref/ds.h5")
    if b.rc != 0:
        return b
    return a


add("preprocess", "chunk-size-1-equals-one-chunk", "ok-path", "ok", _chunk_invariance, check=lambda c, r: same_h5(c.p("out/ds.h5"), c.p("ref/ds.h5"), atol=1e-5))  # fmt: skip
add("preprocess", "memory-budget-tiny-equals-default", "ok-path", "ok", lambda c: pre(c, c.f("demo", "geo.gctx"), "--memory-mb", "1"), check=same_dataset("out/ds.h5", "ds_geo.h5"))  # fmt: skip


# --------------------------------------------------------------------------- #
# preprocess: where the output goes
# --------------------------------------------------------------------------- #
def _pre_out_dir(c):
    c.p("out", "ds.h5").mkdir(parents=True)
    return pre(c, c.f("demo", "geo.gctx"))


add("preprocess", "output-is-a-directory", "unwritable-output", "error", _pre_out_dir, msg=("ds.h5",))
add("preprocess", "output-parent-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("out")), pre(c, c.f("demo", "geo.gctx")))[1], msg=("out",))  # fmt: skip


def _pre_readonly(c):
    c.tmpfs("out", ro=True)
    return pre(c, c.f("demo", "geo.gctx"))


add("preprocess", "read-only-filesystem", "unwritable-output", "error", _pre_readonly, msg=("out",))


def _pre_noperm(c):
    _, prefix = c.unwritable("out")
    return c.dgex("preprocess", "--geo", c.f("demo", "geo.gctx"), *PRE_ARGS, "--output", "out/ds.h5", prefix=prefix)


add("preprocess", "no-write-permission", "unwritable-output", "error", _pre_noperm, msg=("out",))


def _pre_full(c):
    c.tmpfs("out", size="2m", leave=300_000)
    return pre(c, c.f("demo", "geo.gctx"))


add("preprocess", "disk-full", "disk-full", "error", _pre_full, msg=("out",), outputs=PRE_OUT)


def _pre_summary_dir(c):
    c.p("out", "ds.json").mkdir(parents=True)
    return pre(c, c.f("demo", "geo.gctx"), "--summary", "out/ds.json")


add("preprocess", "summary-path-is-a-directory", "unwritable-output", "error", _pre_summary_dir, msg=("ds.json",))  # fmt: skip


def _pre_stale(c):
    out = c.p("out")
    out.mkdir()
    (out / f".ds.h5.{DEAD_PID}.work.h5").write_bytes(b"\0" * 100_000)
    (out / f".ds.h5.{DEAD_PID}.tmp").write_bytes(b"\0" * 1000)
    return pre(c, c.f("demo", "geo.gctx"))


add("preprocess", "stale-temp-files-of-dead-run", "leftovers", "ok", _pre_stale, check=same_dataset("out/ds.h5", "ds_geo.h5"))  # fmt: skip


def _pre_killed(sig):
    def body(c):
        big = c.fx.big_demo()
        args = ["preprocess", "--geo", big / "geo.gctx", *PRE_ARGS, "--output", "out/ds.h5"]
        first = run_paused(args, c.dir, "h5write:5", sig=sig)  # the work file is being filled
        _killed_leaving(c, first, sig, ".*.work.h5")
        res = c.dgex(*[str(a) for a in args])
        if res.rc == 0:
            ref = c.dgex(*[str(a) for a in args[:-1]], "ref/ds.h5")
            if ref.rc != 0:
                raise RuntimeError(f"reference preprocess failed: {ref.stderr[-500:]}")
        return res

    return body


def _PRE_KILL_CHECK(c, r):
    return same_h5(c.p("out/ds.h5"), c.p("ref/ds.h5"))


add("preprocess", "sigkill-then-rerun", "kill-rerun", "ok", _pre_killed(signal.SIGKILL), check=_PRE_KILL_CHECK, slow=True)  # fmt: skip
add("preprocess", "sigterm-then-rerun", "kill-rerun", "ok", _pre_killed(signal.SIGTERM), check=_PRE_KILL_CHECK, slow=True)  # fmt: skip


# --------------------------------------------------------------------------- #
# train
# --------------------------------------------------------------------------- #
TR_OUT = ("out/run.json", "out/per_gene.csv")


def tr(c, dataset=None, *extra, out="out", **kw):
    return c.dgex(*train_argv(dataset or c.f("ds.h5"), out, extra=extra, **kw))


def h5_variant(c, fixture, name, fn) -> Path:
    """A copy of a fixture HDF5 file modified in place by ``fn(h5)``."""
    path = c.copy(fixture, name)
    with h5py.File(path, "r+") as h5:
        fn(h5)
    return path


def _per_gene_equal(out_dir, ref_dir):
    def check(ctx, res):
        a = pd.read_csv(ctx.p(out_dir, "per_gene.csv"))
        ref = ref_dir(ctx) if callable(ref_dir) else ctx.f(ref_dir)
        b = pd.read_csv(Path(ref, "per_gene.csv"))
        if a.shape != b.shape or list(a.columns) != list(b.columns):
            return f"per_gene.csv has shape {a.shape}, the reference {b.shape}"
        num = a.select_dtypes("number").columns
        if not np.allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=0, atol=1e-9, equal_nan=True):
            return "per_gene.csv differs from the reference run"
        return None

    return check


def _ds_nan(h5):
    x = h5["splits/geo-tr/X"]
    x[0, 0] = np.nan


def _not_diverged(ctx, res):
    line = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    return "a NaN in the data is reported as divergence" if line and "lower --lr" in line[-1] else None


add("train", "dataset-missing", "missing-file", "error", lambda c: tr(c, c.p("nope.h5")), msg=("nope.h5",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-empty", "empty-file", "error", lambda c: tr(c, touch_file(c.p("ds.h5"), b"")), msg=("ds.h5",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-garbage", "corrupt-file", "error", lambda c: tr(c, garbage(c.p("ds.h5"))), msg=("ds.h5",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-truncated", "truncated-file", "error", lambda c: tr(c, truncate_copy(c.f("ds.h5"), c.p("ds.h5"), 0.5)), msg=("ds.h5",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-is-a-gctx", "wrong-format", "error", lambda c: tr(c, c.f("demo", "geo.gctx")), msg=("geo.gctx",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-without-geo-va", "corrupt-file", "error", lambda c: tr(c, h5_variant(c, "ds.h5", "ds.h5", lambda h: h.__delitem__("splits/geo-va"))), msg=("geo-va",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-without-gene-tables", "corrupt-file", "error", lambda c: tr(c, h5_variant(c, "ds.h5", "ds.h5", lambda h: h.__delitem__("genes"))), msg=("ds.h5",), outputs=TR_OUT)  # fmt: skip
add("train", "dataset-holds-nan", "nan-inf", "error", lambda c: tr(c, h5_variant(c, "ds.h5", "ds.h5", _ds_nan)), msg=("nan",), check=_not_diverged, outputs=TR_OUT)  # fmt: skip
add("train", "part-beyond-dataset", "bad-number", "error", lambda c: tr(c, None, part=5), msg=("part",), outputs=TR_OUT)  # fmt: skip
add("train", "part-negative", "bad-number", "error", lambda c: tr(c, None, part=-1), msg=("part",), outputs=TR_OUT)
add("train", "part-not-a-number", "bad-number", "error", lambda c: tr(c, None, part="first"), msg=("part",), outputs=TR_OUT)  # fmt: skip
add("train", "layers-zero", "bad-number", "error", lambda c: tr(c, None, layers=0), msg=("layers",), outputs=TR_OUT)
add("train", "dropout-one", "bad-number", "error", lambda c: tr(c, None, dropout=1), msg=("dropout",), outputs=TR_OUT)
add("train", "lr-nan", "bad-number", "error", lambda c: tr(c, None, "--lr", "nan"), msg=("lr",), outputs=TR_OUT)


def _warned_in_run_json(ctx, res):
    info = json.loads(ctx.p("out", "run.json").read_text())
    return None if "trivial" in info.get("warning", "") else "run.json has no warning about the trivial predictor"


# the loss stays finite but validation is ~1e13 times worse than predicting the mean: a real but meaningless
# measurement, kept (a grid may hold a bad learning rate) and flagged in the log and run.json
add("train", "lr-huge-diverges", "bad-number", "warn-ok", lambda c: tr(c, None, "--lr", "1e12"), warn="diverged.*trivial predictor.*--lr", check=_warned_in_run_json)  # fmt: skip
add("train", "lr-decay-above-one", "bad-number", "error", lambda c: tr(c, None, "--lr-decay", "2"), msg=("lr-decay",), outputs=TR_OUT)  # fmt: skip
add("train", "momentum-one", "bad-number", "error", lambda c: tr(c, None, "--momentum", "1"), msg=("momentum",), outputs=TR_OUT)  # fmt: skip
add("train", "epochs-zero", "bad-number", "error", lambda c: tr(c, None, epochs=0), msg=("epochs",), outputs=TR_OUT)
add("train", "threads-zero", "bad-number", "error", lambda c: tr(c, None, "--threads", "0"), msg=("threads",), outputs=TR_OUT)  # fmt: skip
add("train", "checkpoint-interval-nan", "bad-number", "error", lambda c: tr(c, None, "--checkpoint-interval", "nan"), msg=("checkpoint-interval",), outputs=TR_OUT)  # fmt: skip
add("train", "weight-decay-negative", "bad-number", "error", lambda c: tr(c, None, "--optimizer", "adamw", "--weight-decay", "-1"), msg=("weight-decay",), outputs=TR_OUT)  # fmt: skip
add("train", "weight-decay-nan", "bad-number", "error", lambda c: tr(c, None, "--optimizer", "adamw", "--weight-decay", "nan"), msg=("weight-decay",), outputs=TR_OUT)  # fmt: skip
add("train", "device-bogus", "bad-config", "error", lambda c: tr(c, None, "--device", "tpu"), msg=("device",), outputs=TR_OUT)  # fmt: skip


def _cuda_absent(c):
    import torch

    if torch.cuda.is_available():
        raise Skip("a CUDA device is present: --device cuda is valid here")
    return tr(c, None, "--device", "cuda")


add("train", "device-cuda-without-gpu", "bad-config", "error", _cuda_absent, msg=("cuda",), outputs=TR_OUT)


def _n_train(ctx) -> int:
    with h5py.File(ctx.f("ds.h5"), "r") as h5:
        return int(h5["splits/geo-tr/X"].shape[0])


def _same_as_flag(flag, huge):
    def body(c):
        a = tr(c, None, flag, str(huge), out="out")
        if a.rc != 0:
            return a
        b = tr(c, None, flag, str(_n_train(c)), out="ref")
        if b.rc != 0:
            raise RuntimeError(f"reference run failed: {b.stderr[-500:]}")
        return a

    return body


add("train", "batch-size-beyond-data-equals-one-batch", "bad-number", "ok", _same_as_flag("--batch-size", 10**9), check=_per_gene_equal("out", lambda c: c.p("ref")))  # fmt: skip
add("train", "monitor-size-beyond-data-equals-all", "bad-number", "ok", _same_as_flag("--monitor-size", 10**9), check=_per_gene_equal("out", lambda c: c.p("ref")))  # fmt: skip
add("train", "output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("out")), tr(c))[1], msg=("out",))  # fmt: skip


def _tr_readonly(c):
    c.tmpfs("out", ro=True)
    return tr(c)


add("train", "read-only-filesystem", "unwritable-output", "error", _tr_readonly, msg=("out",))


def _tr_noperm(c):
    _, prefix = c.unwritable("out")
    return c.dgex(*train_argv(c.f("ds.h5"), "out"), prefix=prefix)


add("train", "no-write-permission", "unwritable-output", "error", _tr_noperm, msg=("out",))


def _tr_full(c):
    c.tmpfs("out", size="64k", leave=6000)
    return tr(c, None, "--checkpoint-interval", "0")


add("train", "disk-full", "disk-full", "error", _tr_full, msg=("out",), outputs=TR_OUT)


def _first_run(c, dataset="ds.h5", epochs=1, part=0, extra=()):
    res = c.dgex(*train_argv(c.f(dataset), "out", part=part, epochs=epochs, extra=("--keep-last", "--checkpoint-interval", "0", *extra)))  # fmt: skip
    if res.rc != 0 or not c.p("out", "last.ckpt").is_file():
        raise RuntimeError(f"first (resumable) run failed: {res.stderr[-800:]}")
    return res


def _resume_other_split(c):
    _first_run(c)
    return tr(c, c.f("ds_split1.h5"), "--resume")


add("train", "resume-on-other-split", "mismatched-inputs", "error", _resume_other_split)


def _resume_missing_split(c):
    _first_run(c)
    return tr(c, c.f("ds_geo.h5"), "--resume")


add("train", "resume-without-tracked-split", "mismatched-inputs", "error", _resume_missing_split)


def _resume_other_genes(c):
    _first_run(c)
    return tr(c, c.f("ds_parts1.h5"), "--resume")


add("train", "resume-on-other-genes", "mismatched-inputs", "error", _resume_other_genes, msg=("genes",))


def _resume_other_units(c):
    _first_run(c)
    return tr(c, None, "--resume", units=4)


add("train", "resume-with-other-units", "mismatched-inputs", "error", _resume_other_units, msg=("units",))


def _resume_truncated(c):
    _first_run(c)
    truncate_copy(c.p("out", "last.ckpt"), c.p("out", "last.ckpt"), 0.5)
    return tr(c, None, "--resume")


add("train", "resume-truncated-checkpoint", "truncated-file", "reject", _resume_truncated, msg=("last.ckpt",), warn="last.ckpt", check=_per_gene_equal("out", "runs/1x8_d0/part0"))  # fmt: skip


def _resume_garbage(c):
    touch_file(c.p("out", "last.ckpt"), b"this is not a checkpoint\n")
    return tr(c, None, "--resume")


add("train", "resume-garbage-checkpoint", "corrupt-file", "reject", _resume_garbage, msg=("last.ckpt",), warn="last.ckpt", check=_per_gene_equal("out", "runs/1x8_d0/part0"))  # fmt: skip


def _resume_fewer(c):
    _first_run(c, epochs=3)
    return tr(c, None, "--resume", epochs=2)


add("train", "resume-with-fewer-epochs", "bad-number", "reject", _resume_fewer, msg=("epochs",), warn="epoch", check=ok_files("out/run.json"))  # fmt: skip


def _resume_after_final(c):
    """Killed after the last epoch's checkpoint, before run.json; Snakemake then removes the job's outputs."""
    _first_run(c, epochs=2)
    for name in ("run.json", "per_gene.csv", "history.csv"):
        c.p("out", name).unlink()
    return tr(c, None, "--resume")


def _history_too(ctx, res):
    if not ctx.p("out", "history.csv").is_file():
        return "no history.csv: the workflow's rerun fails (MissingOutputException)"
    return _per_gene_equal("out", "runs/1x8_d0/part0")(ctx, res)


add("train", "resume-after-final-epoch-checkpoint", "kill-rerun", "ok", _resume_after_final, check=_history_too)  # fmt: skip


def _tr_stale(c):
    out = c.p("out")
    out.mkdir()
    for name in (f".last.ckpt.{DEAD_PID}.tmp", f".history.csv.{DEAD_PID}.tmp", f".best_geo-va.pt.{DEAD_PID}.tmp"):
        (out / name).write_bytes(b"\0" * 1000)
    return tr(c, None, "--resume")


add("train", "stale-temp-files-of-dead-run", "leftovers", "ok", _tr_stale, check=_per_gene_equal("out", "runs/1x8_d0/part0"))  # fmt: skip


def _tr_concurrent(c):
    """A second train on a run folder that a live train is writing (a rerun racing the job of a killed
    Snakemake): refused with one line; the first is paused once it holds the folder, then killed."""
    second = []
    first = run_paused(
        train_argv(c.f("ds.h5"), "out"),
        c.dir,
        "call=dgex.train.DGEX:1",
        while_paused=lambda: second.append(tr(c)),
    )
    if first.rc != -signal.SIGKILL or not second:
        raise RuntimeError(f"the paused first train ended with exit {first.rc}: {first.stderr[-500:]}")
    return second[0]


add("train", "second-train-on-a-busy-run-folder", "concurrent-run", "error", _tr_concurrent, msg=("out", "another dgex train"))  # fmt: skip


def _tr_existing(c):
    c.copy("runs/1x8_d0/part0", "out")
    (c.p("out", "per_gene.csv")).write_text("stale\n")
    return tr(c)


add("train", "existing-run-without-resume-retrains", "existing-output", "ok", _tr_existing, check=_per_gene_equal("out", "runs/1x8_d0/part0"))  # fmt: skip


def _tr_killed(sig):
    def body(c):
        ref = c.fx.reference_train()
        args = train_argv(c.f("ds.h5"), "out", epochs=6, extra=("--checkpoint-interval", "0"))
        # paused at epoch 3's first history write (two per epoch: after validation, after the training
        # epoch; last.ckpt of epoch 2 in place): a tiny training is over in a fraction of a second, so a
        # kill on a trigger could come too late
        first = run_paused(args, c.dir, "call=dgex.training.logger.HistoryLogger.write:5", sig=sig)
        want = -signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM
        if first.rc != want:
            raise RuntimeError(
                f"the paused training ended with exit {first.rc}, expected {want}: {first.stderr[-500:]}"
            )
        c.notes.append(f"killed: exit {first.rc}")
        c._ref = ref
        return c.dgex(*args, "--resume")

    return body


def _tr_kill_check(ctx, res):
    bad = _per_gene_equal("out", lambda c: c._ref)(ctx, res)
    if bad:
        return bad
    a = pd.read_csv(ctx.p("out", "history.csv")).drop(columns=["seconds"])
    b = pd.read_csv(Path(ctx._ref, "history.csv")).drop(columns=["seconds"])
    return None if a.equals(b) else "history.csv differs from the uninterrupted run"


add("train", "sigkill-then-resume", "kill-rerun", "ok", _tr_killed(signal.SIGKILL), check=_tr_kill_check, slow=True)  # fmt: skip
add("train", "sigterm-then-resume", "kill-rerun", "ok", _tr_killed(signal.SIGTERM), check=_tr_kill_check, slow=True)  # fmt: skip


def _gpu_lock_file(c):
    touch_file(c.p("locks"))
    return tr(c, None, "--device", "auto", "--gpu-lock-dir", "locks")


def _gpu_env(fn):
    def body(c):
        orig = c.dgex

        def with_env(*args, env=None, **kw):
            return orig(*args, env={**(env or {}), "DGEX_GPUS": "0"}, **kw)

        c.dgex = with_env
        return fn(c)

    return body


def _gpu_lock_other_user(held):
    """A lock folder shared on purpose (``--gpu-lock-dir``, 1777) holding another user's read-only gpu0.lock.

    flock needs no write access, so users of one shared folder still exclude each other: with the lock
    held (by the sweep, standing in for the other user's job) training must lease GPU 1, never share GPU 0;
    with it free, GPU 0.
    """

    def body(c):
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            raise Skip("needs root and setpriv to create a lock file of another user")
        locks = c.p("locks")
        locks.mkdir()
        locks.chmod(0o1777)
        lock = touch_file(locks / "gpu0.lock", b"4242 otherhost\n")
        os.chown(lock, 65534, 65534)
        lock.chmod(0o644)
        fd = os.open(lock, os.O_RDONLY)
        try:
            if held:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
            argv = [*train_argv(c.f("ds.h5"), "out"), "--device", "auto", "--gpu-lock-dir", locks]
            return c.dgex(*argv, env={"DGEX_GPUS": "0,1"}, prefix=prefix)
        finally:
            os.close(fd)

    return body


def _leased(gpu):
    def check(ctx, res):
        lease = json.loads(ctx.p("out", "run.json").read_text()).get("gpu_lease") or {}
        return None if lease.get("gpu") == gpu else f"leased {lease}, expected GPU {gpu}"

    return check


def _gpu_lock_is_dir(c):
    c.p("locks", "gpu0.lock").mkdir(parents=True)
    return c.dgex(*train_argv(c.f("ds.h5"), "out"), "--device", "auto", "--gpu-lock-dir", "locks")


add("train", "gpu-lock-dir-is-a-file", "gpu-locks", "error", _gpu_env(_gpu_lock_file), msg=("locks",), outputs=TR_OUT)  # fmt: skip
add("train", "gpu-lock-file-of-another-user", "gpu-locks", "ok", _gpu_lock_other_user(held=True), check=_leased("1"))  # fmt: skip
add("train", "gpu-lock-file-of-another-user-free", "gpu-locks", "ok", _gpu_lock_other_user(held=False), check=_leased("0"))  # fmt: skip
add("train", "gpu-lock-file-is-a-directory", "gpu-locks", "error", _gpu_env(_gpu_lock_is_dir), msg=("gpu0.lock",), outputs=TR_OUT)  # fmt: skip


# --------------------------------------------------------------------------- #
# baseline
# --------------------------------------------------------------------------- #
BL_OUT = ("out/run.json", "out/per_gene.csv", "out/metrics.json")


def bl(c, method="lr", *extra, dataset=None):
    return c.dgex("baseline", method, "--dataset", dataset or c.f("ds.h5"), "--output-dir", "out", "--no-progress", *extra)  # fmt: skip


def _lr_oracle(ctx, res):
    with h5py.File(ctx.f("toy.h5"), "r") as h5:  # 400 training profiles, 20 landmarks: a unique solution
        X_tr, Y_tr = h5["splits/geo-tr/X"][()], h5["splits/geo-tr/Y"][()]
        X_te, Y_te = h5["splits/geo-te/X"][()], h5["splits/geo-te/Y"][()]
        ens = [v.decode() for v in h5["genes/target/ensembl"][()]]
    mae = np.abs(lstsq_predict(X_tr, Y_tr, X_te) - Y_te).mean(0)
    pg = pd.read_csv(ctx.p("out", "per_gene.csv"), dtype={"ensembl": str})
    rows = pg[(pg["split"] == "geo-te") & (pg["selected_by"] == "geo-va")].set_index("ensembl")
    if len(rows) != len(ens):
        return f"{len(rows)} LR rows on geo-te, expected {len(ens)}"
    got = rows.loc[ens, "mae"].to_numpy(float)
    if not np.allclose(got, mae, rtol=1e-4, atol=1e-5):
        return f"LR per-gene MAE differs from least squares (max |diff| {np.abs(got - mae).max():.3g})"
    return None


add("baseline", "lr-matches-least-squares", "ok-path", "ok", lambda c: bl(c, dataset=c.f("toy.h5")), check=_lr_oracle)
add("baseline", "unknown-method", "bad-config", "error", lambda c: bl(c, "svm"), msg=("svm",), outputs=BL_OUT)
add("baseline", "dataset-missing", "missing-file", "error", lambda c: bl(c, dataset=c.p("nope.h5")), msg=("nope.h5",), outputs=BL_OUT)  # fmt: skip
add("baseline", "dataset-garbage", "corrupt-file", "error", lambda c: bl(c, dataset=garbage(c.p("ds.h5"))), msg=("ds.h5",), outputs=BL_OUT)  # fmt: skip
add("baseline", "dataset-holds-nan", "nan-inf", "error", lambda c: bl(c, dataset=h5_variant(c, "ds.h5", "ds.h5", _ds_nan)), msg=("nan",), outputs=BL_OUT)  # fmt: skip
add("baseline", "ridge-lambda-negative", "bad-number", "error", lambda c: bl(c, "ridge", "--lambdas", "-1"), msg=("lambdas",), outputs=BL_OUT)  # fmt: skip
add("baseline", "ridge-lambda-nan", "bad-number", "error", lambda c: bl(c, "ridge", "--lambdas", "nan"), msg=("lambdas",), outputs=BL_OUT)  # fmt: skip
add("baseline", "knn-k-zero", "bad-number", "error", lambda c: bl(c, "knn", "--ks", "0"), msg=("ks",), outputs=BL_OUT)
add("baseline", "knn-k-beyond-landmarks", "bad-number", "error", lambda c: bl(c, "knn", "--ks", "100000"), msg=("k=",), outputs=BL_OUT)  # fmt: skip
add("baseline", "lr-with-lambdas", "bad-config", "error", lambda c: bl(c, "lr", "--lambdas", "1"), msg=("lambdas",), outputs=BL_OUT)  # fmt: skip
add("baseline", "lasso-n-jobs-zero", "bad-number", "error", lambda c: bl(c, "lasso", "--n-jobs", "0", "--lambdas", "0.1"), msg=("n-jobs",), outputs=BL_OUT)  # fmt: skip
add("baseline", "output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("out")), bl(c))[1], msg=("out",))  # fmt: skip


def _bl_full(c):
    c.tmpfs("out", size="64k", leave=4096)
    return bl(c)


add("baseline", "disk-full", "disk-full", "error", _bl_full, msg=("out",), outputs=BL_OUT)


# --------------------------------------------------------------------------- #
# aggregate
# --------------------------------------------------------------------------- #
def ag(c, dgex_runs=(), baseline_runs=(), out="agg"):
    args = ["aggregate", "--dgex-runs", *dgex_runs, "--baseline-runs", *baseline_runs, "--output-dir", out]
    return c.dgex(*args)


def runs_of(c, arch="1x8_d0", parts=(0, 1), root="runs"):
    return [c.f(root, arch, f"part{p}") for p in parts]


def copied_run(c, fixture="runs/1x8_d0/part0", name="r0", fn=None):
    path = c.copy(fixture, name)
    if fn:
        fn(path)
    return path


def _agg_oracle(ctx, res):
    s = pd.read_csv(ctx.p("agg", "summary.csv"))
    want = []
    for p in (0, 1):
        pg = pd.read_csv(ctx.f("runs", "1x8_d0", f"part{p}", "per_gene.csv"))
        want.append(pg[(pg["selected_by"] == "geo-va") & (pg["split"] == "geo-te")]["mae"])
    want = pd.concat(want)
    row = s[(s["method"] == "D-GEX") & (s["units"] == 8) & (s["selected_by"] == "geo-va") & (s["split"] == "geo-te")]
    if len(row) != 1:
        return f"{len(row)} summary rows for 1x8 geo-va/geo-te"
    row = row.iloc[0]
    if int(row["n_genes"]) != len(want) or not np.isclose(row["mae_mean"], want.mean(), rtol=1e-6):
        return f"summary says {row['n_genes']} genes, MAE {row['mae_mean']}; the runs give {len(want)}, {want.mean()}"
    return None


AG_OUT = ("agg",)
add("aggregate", "summary-matches-runs", "ok-path", "ok", lambda c: ag(c, runs_of(c) + runs_of(c, "1x4_d0"), [c.f("base", "lr")]), check=_agg_oracle)  # fmt: skip
add("aggregate", "no-runs", "missing-file", "error", lambda c: ag(c), msg=("runs",), outputs=AG_OUT)
add("aggregate", "empty-folder-as-run", "missing-file", "error", lambda c: (c.p("r0").mkdir(), ag(c, [c.p("r0")]))[1], msg=("run.json",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "run-json-corrupt", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: garbage(p / "run.json", 200))]), msg=("run.json",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "run-json-is-a-list", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: (p / "run.json").write_text("[1, 2]"))]), msg=("run.json",), outputs=AG_OUT)  # fmt: skip


def _drop_key(key):
    def fn(p):
        info = json.loads((p / "run.json").read_text())
        info.pop(key)
        (p / "run.json").write_text(json.dumps(info))

    return fn


add("aggregate", "run-json-without-n-targets", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=_drop_key("n_targets"))]), msg=("run.json",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "run-json-without-config", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=_drop_key("config"))]), msg=("run.json",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "per-gene-missing", "missing-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: (p / "per_gene.csv").unlink())]), msg=("per_gene.csv",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "per-gene-garbage", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: garbage(p / "per_gene.csv"))]), msg=("per_gene.csv",), outputs=AG_OUT)  # fmt: skip


def _drop_column(name, column):
    def fn(p):
        df = pd.read_csv(p / name)
        df.drop(columns=[column]).to_csv(p / name, index=False)

    return fn


add("aggregate", "per-gene-without-mae", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=_drop_column("per_gene.csv", "mae"))]), msg=("mae",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "history-missing", "missing-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: (p / "history.csv").unlink())]), msg=("history.csv",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "history-garbage", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=lambda p: garbage(p / "history.csv"))]), msg=("history.csv",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "history-without-geo-va", "corrupt-file", "error", lambda c: ag(c, [copied_run(c, fn=_drop_column("history.csv", "geo-va"))]), msg=("history.csv",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "grid-point-missing-a-part", "incomplete-grid", "error", lambda c: ag(c, runs_of(c) + runs_of(c, "1x4_d0", (0,)), [c.f("base", "lr")]), msg=("part",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "only-part-0-of-two", "incomplete-grid", "error", lambda c: ag(c, runs_of(c, parts=(0,))), msg=("part",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "runs-of-two-datasets", "mismatched-inputs", "error", lambda c: ag(c, runs_of(c, parts=(0,)) + [c.f("runs_geo", "1x8_d0", "part0")]), msg=("dataset",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "same-run-twice", "duplicate-ids", "error", lambda c: ag(c, runs_of(c, parts=(0, 0))), msg=("more than one",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "baseline-as-dgex-run", "mismatched-inputs", "error", lambda c: ag(c, [c.f("base", "lr")]), msg=("lr",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "dgex-run-as-baseline", "mismatched-inputs", "error", lambda c: ag(c, (), runs_of(c, parts=(0,))), msg=("part0",), outputs=AG_OUT)  # fmt: skip
add("aggregate", "output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("agg")), ag(c, runs_of(c)))[1], msg=("agg",))  # fmt: skip


def _ag_full(c):
    c.tmpfs("agg", size="64k", leave=4096)
    return ag(c, runs_of(c) + runs_of(c, "1x4_d0"), [c.f("base", "lr")])


add("aggregate", "disk-full", "disk-full", "error", _ag_full, msg=("agg",), outputs=AG_OUT)


# --------------------------------------------------------------------------- #
# tables and figures
# --------------------------------------------------------------------------- #
def tb(c, agg=None, *extra, out="tab"):
    return c.dgex("tables", "--aggregate", agg or c.f("agg"), "--output-dir", out, "--bootstrap", "50", *extra)


def fg(c, agg=None, out="fig"):
    return c.dgex("figures", "--aggregate", agg or c.f("agg"), "--output-dir", out)


def agg_variant(c, fn=None) -> Path:
    path = c.copy("agg", "agg")
    if fn:
        fn(path)
    return path


def _incomplete_grid(path):
    """Drop part 1 of grid point 1x4 from an aggregate and recompute its summary (a silent gap)."""
    from dgex.aggregate import summarise

    pg = pd.read_csv(path / "per_gene.csv.gz", dtype={"ensembl": str, "symbol": str, "entrez": str})
    gap = (pg["method"] == "D-GEX") & (pg["units"] == 4) & (pg["part"] == 1)
    pg = pg[~gap]
    pg.to_csv(path / "per_gene.csv.gz", index=False, compression="gzip")
    summarise(pg).to_csv(path / "summary.csv", index=False, float_format="%.10g")


def _tables_oracle(ctx, res):
    t1 = pd.read_csv(ctx.p("tab", "table1.csv"))
    pg = pd.read_csv(ctx.f("agg", "per_gene.csv.gz"))
    sel = (pg["selected_by"] == "geo-va") & (pg["split"] == "geo-te")
    for method, mask, row in (
        ("LR", pg["method"] == "LR", t1[t1["method"] == "LR"]),
        (
            "1x8",
            (pg["method"] == "D-GEX") & (pg["units"] == 8),
            t1[(t1["method"].str.startswith("D-GEX")) & (t1["units"] == 8)],
        ),
    ):
        want = pg[sel & mask]["mae"]
        if len(row) != 1 or not np.isclose(float(row["mae_mean"].iloc[0]), want.mean(), rtol=1e-5):
            return f"table1 {method}: {row['mae_mean'].tolist()} vs per-gene mean {want.mean():.6f}"
        if not np.isclose(float(row["mae_std"].iloc[0]), want.std(ddof=0), rtol=1e-4):
            return f"table1 {method}: std {row['mae_std'].tolist()} vs {want.std(ddof=0):.6f}"
    return None


TB_OUT = ("tab",)
add("tables", "table1-matches-per-gene", "ok-path", "ok", lambda c: tb(c), check=_tables_oracle)
add("tables", "not-an-aggregate", "missing-file", "error", lambda c: (c.p("agg").mkdir(), tb(c, c.p("agg")))[1], msg=("agg",), outputs=TB_OUT)  # fmt: skip
add("tables", "summary-garbage", "corrupt-file", "error", lambda c: tb(c, agg_variant(c, lambda p: garbage(p / "summary.csv"))), msg=("agg",), outputs=TB_OUT)  # fmt: skip
add("tables", "summary-without-mae-mean", "corrupt-file", "error", lambda c: tb(c, agg_variant(c, _drop_column("summary.csv", "mae_mean"))), msg=("summary",), outputs=TB_OUT)  # fmt: skip
add("tables", "aggregate-json-garbage", "corrupt-file", "error", lambda c: tb(c, agg_variant(c, lambda p: garbage(p / "aggregate.json"))), msg=("agg",), outputs=TB_OUT)  # fmt: skip
add("tables", "grid-point-missing-a-part", "incomplete-grid", "error", lambda c: tb(c, agg_variant(c, _incomplete_grid)), msg=("part",), outputs=TB_OUT)  # fmt: skip
add("tables", "bootstrap-zero", "bad-number", "error", lambda c: tb(c, None, "--bootstrap", "0"), msg=("bootstrap",), outputs=TB_OUT)  # fmt: skip
add("tables", "output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("tab")), tb(c))[1], msg=("tab",))  # fmt: skip


def _tb_readonly(c):
    c.tmpfs("tab", ro=True)
    return tb(c)


add("tables", "read-only-filesystem", "unwritable-output", "error", _tb_readonly, msg=("tab",))


def _fig_oracle(ctx, res):
    info = json.loads(ctx.p("fig", "figures.json").read_text())
    pngs = sorted(ctx.p("fig").glob("*.png"))
    if len(pngs) < 3:
        return f"only {len(pngs)} PNG figures"
    for p in pngs:
        if p.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            return f"{p.name} is not a PNG"
    return None if info else "empty figures.json"


FG_OUT = ("fig",)
add("figures", "figures-are-written", "ok-path", "ok", lambda c: fg(c), check=_fig_oracle)
add("figures", "not-an-aggregate", "missing-file", "error", lambda c: (c.p("agg").mkdir(), fg(c, c.p("agg")))[1], msg=("agg",), outputs=FG_OUT)  # fmt: skip


def _baseline_only_agg(c):
    res = ag(c, (), [c.f("base", "lr")], out="agg")
    if res.rc != 0:
        raise RuntimeError(res.stderr[-500:])
    return fg(c, c.p("agg"))


add("figures", "baseline-only-aggregate", "mismatched-inputs", "error", _baseline_only_agg, msg=("d-gex",), outputs=FG_OUT)  # fmt: skip
add("figures", "grid-point-missing-a-part", "incomplete-grid", "error", lambda c: fg(c, agg_variant(c, _incomplete_grid)), msg=("part",), outputs=FG_OUT)  # fmt: skip
add("figures", "output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("fig")), fg(c))[1], msg=("fig",))  # fmt: skip


def _fg_full(c):
    c.tmpfs("fig", size="64k", leave=4096)
    return fg(c)


add("figures", "disk-full", "disk-full", "error", _fg_full, msg=("fig",), outputs=FG_OUT)


# --------------------------------------------------------------------------- #
# interpret s2 / s3
# --------------------------------------------------------------------------- #
def s2(c, runs=None, dataset=None, *extra, out="s2"):
    runs = runs if runs is not None else runs_of(c, root="toy_runs")
    return c.dgex("interpret", "s2", "--dataset", dataset or c.f("toy.h5"), "--runs", *runs, "--output-dir", out, *INF, *extra)  # fmt: skip


def s3(c, runs=None, *extra, out="s3"):
    runs = runs if runs is not None else runs_of(c, root="toy_runs")
    return c.dgex("interpret", "s3", "--runs", *runs, "--output-dir", out, "--no-progress", *extra)


def _state(run_dir):
    import torch

    blob = torch.load(Path(run_dir, "best_geo-va.pt"), map_location="cpu", weights_only=False)
    return {k: v.double().numpy() for k, v in blob["state_dict"].items()}


def _s2_oracle(ctx, res):
    table = pd.read_csv(ctx.p("s2", "s2_adjusted_r2.csv"), dtype={"ensembl": str})
    with h5py.File(ctx.f("toy.h5"), "r") as h5:
        X, Y = h5["splits/geo-tr/X"][()], h5["splits/geo-tr/Y"][()]
        parts = h5["genes/target/part"][()]
        ens = np.array([v.decode() for v in h5["genes/target/ensembl"][()]])
    for p in (0, 1):
        sd = _state(ctx.f("toy_runs", "1x8_d0", f"part{p}"))
        cols = parts == p
        H = np.tanh(X.astype(np.float64) @ sd["hidden.0.weight"].T + sd["hidden.0.bias"])
        want = {"input": adjusted_r2(X, Y[:, cols]), "hidden1": adjusted_r2(H, Y[:, cols])}
        got = table.set_index("ensembl").loc[ens[cols]]
        for rep, w in want.items():
            if not np.allclose(got[rep].to_numpy(float), w, atol=1e-6):
                return f"part {p} {rep}: adjusted R² differs from least squares (max |diff| {np.nanmax(np.abs(got[rep] - w)):.3g})"  # fmt: skip
    return None


S2_OUT = ("s2",)
add("interpret", "s2-matches-least-squares", "ok-path", "ok", lambda c: s2(c), check=_s2_oracle)
add("interpret", "s2-run-folder-missing", "missing-file", "error", lambda c: s2(c, [c.p("nope")]), msg=("nope",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-dataset-of-other-genes", "mismatched-inputs", "error", lambda c: s2(c, None, c.f("ds.h5")), msg=("dataset",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-split-unknown", "bad-config", "error", lambda c: s2(c, None, None, "--split", "geo-xx"), msg=("split",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-split-not-in-dataset", "bad-config", "error", lambda c: s2(c, [c.f("runs_geo", "1x8_d0", "part0")], c.f("ds_geo.h5"), "--split", "gtex-te"), msg=("gtex-te",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-max-samples-one", "bad-number", "error", lambda c: s2(c, None, None, "--max-samples", "1"), msg=("max-samples",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-batch-size-zero", "bad-number", "error", lambda c: s2(c, None, None, "--batch-size", "0"), msg=("batch-size",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-parts-of-two-networks", "mismatched-inputs", "error", lambda c: s2(c, [c.f("toy_runs", "1x8_d0", "part0"), c.f("toy_runs", "2x8_d0", "part0")]), msg=("different networks",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-selection-without-checkpoint", "mismatched-inputs", "error", lambda c: s2(c, [c.f("runs_geo", "1x8_d0", "part0")], c.f("ds_geo.h5"), "--selection", "1000g-va"), msg=("1000g-va",), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-fewer-samples-than-landmarks", "too-few-samples", "reject", lambda c: s2(c, runs_of(c), c.f("ds.h5")), msg=("samples",), warn="undefined|samples", check=ok_files("s2/s2.json"), outputs=S2_OUT)  # fmt: skip
add("interpret", "s2-output-dir-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("s2")), s2(c))[1], msg=("s2",))  # fmt: skip
add("interpret", "s2-checkpoint-garbage", "corrupt-file", "error", lambda c: s2(c, [copied_run(c, "toy_runs/1x8_d0/part0", "r0", lambda p: garbage(p / "best_geo-va.pt")), c.f("toy_runs", "1x8_d0", "part1")]), msg=("best_geo-va.pt",), outputs=S2_OUT)  # fmt: skip


def _s3_oracle(ctx, res):
    lm = pd.read_csv(ctx.p("s3", "s3_landmark_out_degree.csv"), dtype={"ensembl": str})
    tg = pd.read_csv(ctx.p("s3", "s3_target_in_degree.csv"), dtype={"ensembl": str})
    for p in (0, 1):
        sd = _state(ctx.f("toy_runs", "1x8_d0", f"part{p}"))
        w_in, w_out = sd["hidden.0.weight"], sd["output.weight"]  # (H, L), (T, H)
        lm_want = (np.abs(w_in - w_in.mean(0)) > w_in.std(0)).sum(0)
        tg_want = (np.abs(w_out - w_out.mean(1, keepdims=True)) > w_out.std(1, keepdims=True)).sum(1)
        lm_got = lm[(lm["part"].astype(str) == str(p)) & (lm["sigma"] == 1.0)]["n_hidden"].to_numpy()
        tg_got = tg[(tg["part"].astype(str) == str(p)) & (tg["sigma"] == 1.0)]["n_hidden"].to_numpy()
        if not np.array_equal(lm_got, lm_want) or not np.array_equal(tg_got, tg_want):
            return f"part {p}: major-weight degrees differ from a direct count"
    return None


S3_OUT = ("s3",)
add("interpret", "s3-matches-direct-count", "ok-path", "ok", lambda c: s3(c, None, "--sigmas", "1", "--map-sigmas", "1", "1"), check=_s3_oracle)  # fmt: skip
add("interpret", "s3-two-layer-network", "mismatched-inputs", "error", lambda c: s3(c, [c.f("toy_runs", "2x8_d0", "part0")]), msg=("hidden layer",), outputs=S3_OUT)  # fmt: skip
add("interpret", "s3-sigma-nan", "bad-number", "error", lambda c: s3(c, None, "--sigmas", "nan"), msg=("sigmas",), outputs=S3_OUT)  # fmt: skip
add("interpret", "s3-sigma-inf", "bad-number", "error", lambda c: s3(c, None, "--sigmas", "inf"), msg=("sigmas",), outputs=S3_OUT)  # fmt: skip
add("interpret", "s3-map-size-zero", "bad-number", "error", lambda c: s3(c, None, "--map-size", "0"), msg=("map-size",), outputs=S3_OUT)  # fmt: skip
add("interpret", "s3-dataset-of-other-genes", "mismatched-inputs", "error", lambda c: s3(c, None, "--dataset", c.f("ds.h5")), msg=("dataset",), outputs=S3_OUT)  # fmt: skip
add("interpret", "s3-run-json-corrupt", "corrupt-file", "error", lambda c: s3(c, [copied_run(c, "toy_runs/1x8_d0/part0", "r0", lambda p: garbage(p / "run.json", 100))]), msg=("run.json",), outputs=S3_OUT)  # fmt: skip


def _s3_full(c):
    c.tmpfs("s3", size="64k", leave=4096)
    return s3(c)


add("interpret", "s3-disk-full", "disk-full", "error", _s3_full, msg=("s3",), outputs=S3_OUT)


# --------------------------------------------------------------------------- #
# export
# --------------------------------------------------------------------------- #
EX_OUT = ("model",)


def ex(c, runs=None, dataset=None, *extra, out="model"):
    runs = runs if runs is not None else runs_of(c)
    return c.dgex("export", "--dataset", dataset or c.f("ds.h5"), "--runs", *runs, "--output", out, "--no-progress", *extra)  # fmt: skip


def _export_oracle(ctx, res):
    import torch

    model = ctx.p("model")
    info = json.loads((model / "bundle.json").read_text())
    for p in (0, 1):
        w = torch.load(model / f"weights_part{p}.pt", map_location="cpu", weights_only=True)["state_dict"]
        ref = _state(ctx.f("runs", "1x8_d0", f"part{p}"))
        if set(w) != set(ref) or any(not np.array_equal(w[k].double().numpy(), ref[k]) for k in ref):
            return f"weights_part{p}.pt differs from the run's best_geo-va.pt"
    st = np.load(model / "stats.npz")
    with h5py.File(ctx.f("ds.h5"), "r") as h5:
        mean = h5["stats/geo/mean"][()]
    L = int(info["architecture"]["n_landmarks"])
    if not np.allclose(st["landmark_mean"], mean[:L]):
        return "stats.npz landmark means differ from the dataset's GEO statistics"
    X = np.load(ctx.f("infer_X.npy"))
    if not np.allclose(numpy_predict(model, X), numpy_predict(ctx.f("bundle"), X), atol=1e-5):
        return "the new bundle predicts differently from the same runs' reference bundle"
    return None


def _ex_overwrite(c):
    c.copy("bundle", "model")
    (c.p("model", "weights_part0.pt")).write_bytes(b"old")
    return ex(c, None, None, "--overwrite")


add("export", "overwrite-replaces-bundle", "existing-output", "ok", _ex_overwrite, check=_export_oracle)


def _ex_grid_aggregate(c):
    res = ag(c, runs_of(c) + runs_of(c, "1x4_d0"), [c.f("base", "lr")])
    if res.rc != 0:
        raise RuntimeError(res.stderr[-500:])
    return c.dgex("export", "--dataset", c.f("ds.h5"), "--grid-aggregate", "agg", "--output", "model", "--no-progress")


def _grid_choice_oracle(ctx, res):
    s = pd.read_csv(ctx.p("agg", "summary.csv"))
    v = s[(s["method"] == "D-GEX") & (s["selected_by"] == "geo-va") & (s["split"] == "geo-va")]
    best = v.sort_values("mae_mean").iloc[0]
    arch = json.loads(ctx.p("model", "bundle.json").read_text())["architecture"]
    if (arch["layers"], arch["units"]) != (int(best["layers"]), int(best["units"])):
        return f"exported {arch['layers']}x{arch['units']}, validation picks {int(best['layers'])}x{int(best['units'])}"
    return None


add("export", "grid-aggregate-exports-validation-choice", "ok-path", "ok", _ex_grid_aggregate, check=_grid_choice_oracle)  # fmt: skip


def _ex_exists(c):
    c.copy("bundle", "model")
    remember(c, "model")
    return ex(c)


add("export", "output-exists-without-overwrite", "existing-output", "error", _ex_exists, msg=("--overwrite",), check=unchanged("model"))  # fmt: skip
add("export", "run-folder-missing", "missing-file", "error", lambda c: ex(c, [c.p("nope")]), msg=("nope",), outputs=EX_OUT)  # fmt: skip
add("export", "dataset-missing", "missing-file", "error", lambda c: ex(c, None, c.p("nope.h5")), msg=("nope.h5",), outputs=EX_OUT)  # fmt: skip
add("export", "missing-part", "incomplete-grid", "error", lambda c: ex(c, runs_of(c, parts=(0,))), msg=("part",), outputs=EX_OUT)  # fmt: skip
add("export", "parts-of-two-networks", "mismatched-inputs", "error", lambda c: ex(c, [c.f("runs", "1x8_d0", "part0"), c.f("runs", "1x4_d0", "part1")]), msg=("different networks",), outputs=EX_OUT)  # fmt: skip
add("export", "dataset-of-other-genes", "mismatched-inputs", "error", lambda c: ex(c, None, c.f("toy.h5")), msg=("dataset",), outputs=EX_OUT)  # fmt: skip
add("export", "dataset-with-other-parts", "mismatched-inputs", "error", lambda c: ex(c, None, c.f("ds_parts1.h5")), msg=("part",), outputs=EX_OUT)  # fmt: skip
add("export", "checkpoint-truncated", "truncated-file", "error", lambda c: ex(c, [copied_run(c, fn=lambda p: truncate_copy(p / "best_geo-va.pt", p / "best_geo-va.pt", 0.5)), c.f("runs", "1x8_d0", "part1")]), msg=("best_geo-va.pt",), outputs=EX_OUT)  # fmt: skip
add("export", "checkpoint-garbage", "corrupt-file", "error", lambda c: ex(c, [copied_run(c, fn=lambda p: garbage(p / "best_geo-va.pt")), c.f("runs", "1x8_d0", "part1")]), msg=("best_geo-va.pt",), outputs=EX_OUT)  # fmt: skip
add("export", "checkpoint-missing", "missing-file", "error", lambda c: ex(c, [copied_run(c, fn=lambda p: (p / "best_geo-va.pt").unlink()), c.f("runs", "1x8_d0", "part1")]), msg=("best_geo-va.pt",), outputs=EX_OUT)  # fmt: skip
add("export", "selection-without-checkpoint", "mismatched-inputs", "error", lambda c: c.dgex("export", "--dataset", c.f("ds_geo.h5"), "--runs", c.f("runs_geo", "1x8_d0", "part0"), "--selection", "1000g-va", "--output", "model", "--no-progress"), msg=("1000g-va",), outputs=EX_OUT)  # fmt: skip
add("export", "grid-aggregate-not-an-aggregate", "missing-file", "error", lambda c: (c.p("agg").mkdir(), c.dgex("export", "--dataset", c.f("ds.h5"), "--grid-aggregate", "agg", "--output", "model"))[1], msg=("agg",), outputs=EX_OUT)  # fmt: skip
add("export", "runs-and-grid-aggregate", "bad-config", "error", lambda c: c.dgex("export", "--dataset", c.f("ds.h5"), "--runs", *runs_of(c), "--grid-aggregate", c.f("agg"), "--output", "model"), msg=("grid-aggregate",), outputs=EX_OUT)  # fmt: skip
add("export", "output-parent-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("out")), ex(c, None, None, out="out/model"))[1], msg=("out",))  # fmt: skip


def _ex_readonly(c):
    c.tmpfs("ro", ro=True)
    return ex(c, None, None, out="ro/model")


add("export", "read-only-filesystem", "unwritable-output", "error", _ex_readonly, msg=("ro",))


def _ex_full(c):
    c.tmpfs("full", size="128k", leave=8192)
    return ex(c, None, None, out="full/model")


add("export", "disk-full", "disk-full", "error", _ex_full, msg=("full",), outputs=("full/model",))


def _ex_stale(c):
    stale = c.p(f".model.{DEAD_PID}.tmp")
    stale.mkdir()
    (stale / "weights_part0.pt").write_bytes(b"\0" * 1000)
    (c.p(f".model.{DEAD_PID}.old")).mkdir()
    return ex(c)


add("export", "stale-temp-folders-of-dead-run", "leftovers", "ok", _ex_stale, check=_export_oracle)


def _killed_leaving(c, first, sig, pattern):
    """The first run died by ``sig`` (SIGKILL) or ended as dgex ends on it (SIGTERM: 143); after SIGKILL the
    pause point guarantees a temporary file was left, so the rerun really has to clean it up."""
    want = -signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM
    if first.rc != want:
        raise RuntimeError(f"the paused run ended with exit {first.rc}, expected {want}: {first.stderr[-500:]}")
    if sig == signal.SIGKILL and not any(c.dir.rglob(pattern)):
        raise RuntimeError(f"the killed run left no {pattern}: the rerun tests nothing")
    c.notes.append(f"killed: exit {first.rc}")


def _ex_killed(c):
    args = ["export", "--dataset", c.f("ds.h5"), "--runs", *runs_of(c), "--output", "model", "--overwrite"]
    # paused just before bundle.json is renamed into the temporary bundle folder: that folder is complete but for it
    first = run_paused(args, c.dir, "before-rename:1")
    _killed_leaving(c, first, signal.SIGKILL, ".model~*.tmp")
    return c.dgex(*args, "--no-progress")


add("export", "sigkill-then-rerun", "kill-rerun", "ok", _ex_killed, check=_export_oracle, slow=True)


# --------------------------------------------------------------------------- #
# infer: the model bundle
# --------------------------------------------------------------------------- #
IN_OUT = ("out/pred.gctx", "out/pred.csv")


def inf(c, inp=None, *extra, model=None, out="out/pred.gctx"):
    return c.dgex("infer", "--model", model or c.f("bundle"), "--input", inp or c.f("in_ens.tsv"), "--output", out, *INF, *extra)  # fmt: skip


def rehash(model: Path) -> None:
    info = json.loads((model / "bundle.json").read_text())
    info["files"] = {f: _sha(model / f) for f in info["files"]}
    (model / "bundle.json").write_text(json.dumps(info))


def bundle_variant(c, fn, rehashed=False) -> Path:
    """A copy of the fixture bundle changed by ``fn(model, info)`` (``info`` = bundle.json, written back)."""
    model = c.copy("bundle", "model")
    info = json.loads((model / "bundle.json").read_text())
    fn(model, info)
    (model / "bundle.json").write_text(json.dumps(info))
    if rehashed:
        rehash(model)
    return model


def _tamper_weights(model: Path, name="weights_part0.pt"):
    """Double the output weights: the file still loads, the predictions change."""
    import torch

    blob = torch.load(model / name, map_location="cpu", weights_only=True)
    blob["state_dict"]["output.weight"] = blob["state_dict"]["output.weight"] * 2
    torch.save(blob, model / name)


def _bitflip(path: Path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _info_set(**kw):
    def fn(model, info):
        info.update(kw)

    return fn


add("infer", "model-missing", "missing-file", "error", lambda c: inf(c, None, model=c.p("nope")), msg=("nope",), outputs=IN_OUT)  # fmt: skip
add("infer", "model-empty-folder", "missing-file", "error", lambda c: (c.p("model").mkdir(), inf(c, None, model=c.p("model")))[1], msg=("bundle.json",), outputs=IN_OUT)  # fmt: skip
add("infer", "model-is-a-file", "wrong-format", "error", lambda c: inf(c, None, model=c.f("ds.h5")), msg=("ds.h5",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-json-garbage", "corrupt-file", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: None) and garbage(c.p("model", "bundle.json"), 300) and c.p("model")), msg=("bundle.json",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-json-is-a-list", "corrupt-file", "error", lambda c: inf(c, None, model=(bundle_variant(c, lambda m, i: None), c.p("model", "bundle.json").write_text("[]"), c.p("model"))[2]), msg=("bundle",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-format-version-3", "wrong-format", "error", lambda c: inf(c, None, model=bundle_variant(c, _info_set(format_version=3))), msg=("version",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-weights-bitflip", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: _bitflip(m / "weights_part0.pt"))), msg=("model",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-weights-tampered", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: _tamper_weights(m))), msg=("checksum",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-weights-truncated", "truncated-file", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: truncate_copy(m / "weights_part1.pt", m / "weights_part1.pt", 0.5))), msg=("weights_part1.pt",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-weights-missing", "missing-file", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: (m / "weights_part1.pt").unlink())), msg=("weights_part1.pt",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-stats-missing", "missing-file", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: (m / "stats.npz").unlink())), msg=("stats.npz",), outputs=IN_OUT)  # fmt: skip


def _short_stats(model, info):
    st = dict(np.load(model / "stats.npz"))
    st["target_std"] = st["target_std"][:-3]
    np.savez(model / "stats.npz", **st)


add("infer", "bundle-stats-wrong-length", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, _short_stats, rehashed=True)), msg=("target_std",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-targets-truncated", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: (m / "targets.tsv").write_text("".join((m / "targets.tsv").read_text().splitlines(True)[:5])), rehashed=True)), msg=("targets.tsv",), outputs=IN_OUT)  # fmt: skip


def _drop_checksum(model, info):
    _tamper_weights(model)
    info["files"].pop("weights_part0.pt")


add("infer", "bundle-checksum-entry-removed", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, _drop_checksum)), msg=("weights_part0.pt",), outputs=IN_OUT)  # fmt: skip


def _no_checksums(model, info):
    _tamper_weights(model)
    info["files"] = {}


add("infer", "bundle-checksum-list-empty", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, _no_checksums)), msg=("bundle",), outputs=IN_OUT)  # fmt: skip
add("infer", "bundle-part-without-target-start", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, lambda m, i: i["parts"][0].pop("target_start"))), msg=("target_start",), outputs=IN_OUT)  # fmt: skip


def _escape_file(model, info):
    shutil.copy(model / "weights_part0.pt", model.parent / "w.pt")
    _tamper_weights(model.parent, "w.pt")
    info["parts"][0]["file"] = "../w.pt"


add("infer", "bundle-part-file-outside-bundle", "tampered-bundle", "error", lambda c: inf(c, None, model=bundle_variant(c, _escape_file)), msg=("w.pt",), outputs=IN_OUT)  # fmt: skip


# --------------------------------------------------------------------------- #
# infer: the input
# --------------------------------------------------------------------------- #
def X0(c):
    return np.load(c.f("infer_X.npy"))


def LM(c):
    return bundle_landmarks(c.f("bundle"))


def samples(n):
    return [f"smp{i:03d}" for i in range(n)]


def inp(c, name, X=None, ids=None, cols=None, sep=None):
    X = X0(c) if X is None else X
    ids = list(LM(c)["ensembl"]) if ids is None else ids
    write_table(c.p(name), X, ids, cols or samples(len(X)), sep=sep)
    return c.p(name)


def pred_check(out="out/pred.gctx", X=None, present=None, transform=None, atol=1e-4):
    def check(ctx, res):
        x = X0(ctx) if X is None else X(ctx)
        if transform is not None:
            x = transform(ctx, x)
        want = numpy_predict(ctx.f("bundle"), x, present)
        path = ctx.p(out)
        tg = list(bundle_targets(ctx.f("bundle"))["ensembl"])
        if path.name.endswith((".gctx", ".h5")):
            data, rows, cols = read_gctx(path)
        else:
            df = pd.read_csv(path, sep="," if ".csv" in path.suffixes else "\t", dtype={"id": str})
            rows = list(df["id"])
            # row metadata first (id, CMap fields, flags, the bundle's reliability columns), then one column per sample
            cols = list(df.columns[-len(x) :]) if len(df.columns) > len(x) else []
            if not cols or df.columns[0] != "id":
                return f"text output columns {list(df.columns)[:5]}... are not id, row metadata, then the samples"
            data = df[cols].to_numpy(float).T
        if rows != tg:
            return "output rows are not the bundle's targets in order"
        if len(cols) != len(x):
            return f"{len(cols)} output samples, expected {len(x)}"
        if not np.allclose(data, want, atol=atol, rtol=1e-5):
            return f"predictions differ from an independent forward pass (max |diff| {np.abs(data - want).max():.3g})"
        return None

    return check


add("infer", "ensembl-ids-predict-correctly", "ok-path", "ok", lambda c: inf(c), check=pred_check())
add("infer", "csv-output-predicts-correctly", "ok-path", "ok", lambda c: inf(c, None, out="out/pred.csv"), check=pred_check("out/pred.csv", atol=1e-3))  # fmt: skip
add("infer", "symbol-ids", "ok-path", "ok", lambda c: inf(c, inp(c, "in.tsv", ids=list(LM(c)["symbol"]))), check=pred_check())  # fmt: skip
add("infer", "entrez-ids", "ok-path", "ok", lambda c: inf(c, inp(c, "in.tsv", ids=list(LM(c)["entrez"]))), check=pred_check())  # fmt: skip
add("infer", "probe-ids", "ok-path", "ok", lambda c: inf(c, inp(c, "in.tsv", ids=list(LM(c)["probe"]))), check=pred_check())  # fmt: skip
add("infer", "versioned-ensembl-ids", "ok-path", "ok", lambda c: inf(c, inp(c, "in.tsv", ids=[e + ".7" for e in LM(c)["ensembl"]])), check=pred_check())  # fmt: skip


def _gct_in(c):
    from dgex.io import write_gct

    write_gct(c.p("in.gct"), X0(c), list(LM(c)["ensembl"]), samples(30))
    return inf(c, c.p("in.gct"))


add("infer", "gct-input", "ok-path", "ok", _gct_in, check=pred_check(atol=1e-3))
add("infer", "chunk-and-batch-of-one", "ok-path", "ok", lambda c: inf(c, None, "--chunk-size", "1", "--batch-size", "1"), check=pred_check())  # fmt: skip


def _qn_transform(ctx, x):
    ref = np.load(ctx.f("bundle", "stats.npz"))["landmark_quantiles"]
    ranks = np.argsort(np.argsort(x, axis=1, kind="stable"), axis=1)
    return ref[ranks]


add("infer", "quantile-normalize", "ok-path", "ok", lambda c: inf(c, None, "--quantile-normalize"), check=pred_check(transform=_qn_transform))  # fmt: skip
add("infer", "input-missing", "missing-file", "error", lambda c: inf(c, c.p("nope.tsv")), msg=("nope.tsv",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-empty", "empty-file", "error", lambda c: inf(c, touch_file(c.p("in.tsv"), b"")), msg=("in.tsv",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-garbage-gctx", "corrupt-file", "error", lambda c: inf(c, garbage(c.p("in.gctx"))), msg=("in.gctx",), outputs=IN_OUT)  # fmt: skip


def _in_gctx(c, X=None, ids=None, cols=None, name="in.gctx"):
    from dgex.io import write_gctx

    X = X0(c) if X is None else X
    write_gctx(c.p(name), X, ids or list(LM(c)["ensembl"]), cols or samples(len(X)))
    return c.p(name)


add("infer", "input-truncated-gctx", "truncated-file", "error", lambda c: inf(c, truncate_copy(_in_gctx(c), c.p("in.gctx"), 0.6)), msg=("in.gctx",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-duplicate-samples-gctx", "duplicate-ids", "error", lambda c: inf(c, _in_gctx(c, cols=samples(29) + ["smp000"])), msg=("duplicate",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-duplicate-samples-tsv", "duplicate-ids", "error", lambda c: inf(c, inp(c, "in.tsv", cols=samples(29) + ["smp000"])), msg=("duplicate",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-duplicate-samples-csv", "duplicate-ids", "error", lambda c: inf(c, inp(c, "in.csv", cols=samples(29) + ["smp000"])), msg=("duplicate",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-duplicate-gene-rows", "duplicate-ids", "error", lambda c: inf(c, inp(c, "in.tsv", X=np.hstack([X0(c), X0(c)[:, :1]]), ids=list(LM(c)["ensembl"]) + [LM(c)["ensembl"][0]])), msg=("duplicate",), outputs=IN_OUT)  # fmt: skip


def _x_with(fn):
    def make(c):
        x = X0(c).copy()
        fn(x)
        return x

    return make


add("infer", "input-nan", "nan-inf", "error", lambda c: inf(c, inp(c, "in.tsv", X=_x_with(lambda x: x.__setitem__((4, 9), np.nan))(c))), msg=("nan",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-inf", "nan-inf", "error", lambda c: inf(c, _in_gctx(c, X=_x_with(lambda x: x.__setitem__((29, 0), np.inf))(c))), msg=("inf",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-linear-scale", "wrong-scale", "error", lambda c: inf(c, inp(c, "in.tsv", X=2.0 ** X0(c))), msg=("linear",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-z-scores", "wrong-scale", "error", lambda c: inf(c, inp(c, "in.tsv", X=(X0(c) - X0(c).mean(0)) / X0(c).std(0))), msg=("z-score",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-flat-sample", "flat-sample", "reject", lambda c: inf(c, inp(c, "in.tsv", X=_x_with(lambda x: x.__setitem__(2, 8.0))(c))), warn="flat|constant|variance", check=pred_check(X=_x_with(lambda x: x.__setitem__(2, 8.0))), outputs=IN_OUT)  # fmt: skip
add("infer", "input-missing-landmarks", "wrong-ids", "error", lambda c: inf(c, inp(c, "in.tsv", X=X0(c)[:, 5:], ids=list(LM(c)["ensembl"])[5:])), msg=("missing",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-missing-landmarks-imputed", "wrong-ids", "warn-ok", lambda c: inf(c, inp(c, "in.tsv", X=X0(c)[:, 5:], ids=list(LM(c)["ensembl"])[5:]), "--impute-missing", "mean"), warn="missing", check=pred_check(present=np.arange(5, 943)))  # fmt: skip
add("infer", "input-too-few-landmarks-imputed", "wrong-ids", "error", lambda c: inf(c, inp(c, "in.tsv", X=X0(c)[:, :100], ids=list(LM(c)["ensembl"])[:100]), "--impute-missing", "mean"), msg=("landmark",), outputs=IN_OUT)  # fmt: skip


def _transposed_in(c):
    df = pd.DataFrame(X0(c), columns=list(LM(c)["ensembl"]))
    df.insert(0, "sample", samples(30))
    df.to_csv(c.p("in.tsv"), sep="\t", index=False)
    return inf(c, c.p("in.tsv"))


add("infer", "input-transposed", "wrong-orientation", "error", _transposed_in, msg=("in.tsv",), outputs=IN_OUT)
add("infer", "input-wrong-id-type", "wrong-ids", "error", lambda c: inf(c, None, "--id-type", "entrez"), msg=("id",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-unrecognised-ids", "wrong-ids", "error", lambda c: inf(c, inp(c, "in.tsv", ids=[f"gene{i}" for i in range(943)])), msg=("gene",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-without-samples", "empty-file", "error", lambda c: inf(c, touch_file(c.p("in.tsv"), ("id\n" + "\n".join(LM(c)["ensembl"]) + "\n").encode())), msg=("in.tsv",), outputs=IN_OUT)  # fmt: skip
add("infer", "input-semicolon-csv", "wrong-format", "error", lambda c: inf(c, inp(c, "in.csv", sep=";")), msg=("in.csv",), outputs=IN_OUT)  # fmt: skip
add("infer", "device-bogus", "bad-config", "error", lambda c: c.dgex("infer", "--model", c.f("bundle"), "--input", c.f("in_ens.tsv"), "--output", "out/pred.gctx", "--device", "tpu0"), msg=("device",), outputs=IN_OUT)  # fmt: skip
add("infer", "chunk-size-zero", "bad-number", "error", lambda c: inf(c, None, "--chunk-size", "0"), msg=("chunk-size",), outputs=IN_OUT)  # fmt: skip


# parquet is not offered at all (installed pyarrow or not): the name promises a format dgex does not write
add("infer", "parquet-output-not-offered", "wrong-format", "error", lambda c: inf(c, None, out="out/pred.parquet"), msg=("pred.parquet", "parquet output is not offered"), outputs=("out/pred.parquet",))  # fmt: skip


# --------------------------------------------------------------------------- #
# infer: the output
# --------------------------------------------------------------------------- #
def _in_exists(c):
    garbage(c.p("out", "pred.gctx"), 500)
    remember(c, "out/pred.gctx")
    return inf(c)


add("infer", "output-exists-without-overwrite", "existing-output", "error", _in_exists, msg=("--overwrite",), check=unchanged("out/pred.gctx"))  # fmt: skip
add("infer", "output-exists-with-overwrite", "existing-output", "ok", lambda c: (garbage(c.p("out", "pred.gctx"), 500), inf(c, None, "--overwrite"))[1], check=pred_check())  # fmt: skip
add("infer", "output-is-a-directory", "unwritable-output", "error", lambda c: (c.p("out", "pred.gctx").mkdir(parents=True), inf(c))[1], msg=("pred.gctx",))  # fmt: skip
add("infer", "output-is-a-directory-with-overwrite", "unwritable-output", "error", lambda c: (c.p("out", "pred.gctx").mkdir(parents=True), inf(c, None, "--overwrite"))[1], msg=("pred.gctx",))  # fmt: skip
add("infer", "output-parent-is-a-file", "unwritable-output", "error", lambda c: (touch_file(c.p("out")), inf(c))[1], msg=("out",))  # fmt: skip
add("infer", "output-unknown-extension", "wrong-format", "error", lambda c: inf(c, None, out="out/pred.xlsx"), msg=("pred.xlsx",), outputs=("out/pred.xlsx",))  # fmt: skip
add("infer", "output-extension-contradicts-format", "wrong-format", "reject", lambda c: inf(c, None, "--format", "gctx", out="out/pred.csv"), msg=("pred.csv",), warn="pred.csv", check=pred_check("out/pred.csv"), outputs=IN_OUT)  # fmt: skip
add("infer", "output-gctx-gz-is-not-compressed", "wrong-format", "reject", lambda c: inf(c, None, out="out/pred.gctx.gz"), msg=("gz",), warn="gz", check=lambda ctx, r: None if ctx.p("out/pred.gctx.gz").read_bytes()[:2] == b"\x1f\x8b" else "pred.gctx.gz is not gzip data", outputs=("out/pred.gctx.gz",))  # fmt: skip


def _in_same_as_out(c):
    path = _in_gctx(c, name="data.gctx")
    remember(c, "data.gctx")
    return inf(c, path, "--overwrite", out=str(path))


add("infer", "output-is-the-input", "unwritable-output", "error", _in_same_as_out, msg=("input",), check=unchanged("data.gctx"))  # fmt: skip


def _in_readonly(c):
    c.tmpfs("out", ro=True)
    return inf(c)


add("infer", "read-only-filesystem", "unwritable-output", "error", _in_readonly, msg=("out",))


def _in_noperm(c):
    _, prefix = c.unwritable("out")
    return c.dgex("infer", "--model", c.f("bundle"), "--input", c.f("in_ens.tsv"), "--output", "out/pred.gctx", *INF, prefix=prefix)  # fmt: skip


add("infer", "no-write-permission", "unwritable-output", "error", _in_noperm, msg=("out",))


def _in_full(out):
    def body(c):
        c.tmpfs("out", size="256k", leave=4096)
        return inf(c, None, out=out)

    return body


add("infer", "disk-full-gctx", "disk-full", "error", _in_full("out/pred.gctx"), msg=("pred.gctx",), outputs=IN_OUT)  # fmt: skip
add("infer", "disk-full-csv", "disk-full", "error", _in_full("out/pred.csv"), msg=("pred.csv",), outputs=IN_OUT)  # fmt: skip


def _in_stale(c):
    touch_file(c.p("out", f".pred.gctx.{DEAD_PID}.tmp"), b"\0" * 5000)
    return inf(c)


add("infer", "stale-temp-file-of-dead-run", "leftovers", "ok", _in_stale, check=pred_check())


def _in_killed(sig):
    def body(c):
        big = c.fx.infer_big()
        args = ["infer", "--model", c.f("bundle"), "--input", big, "--output", "out/pred.gctx"]
        args += [*INF, "--chunk-size", "64", "--batch-size", "8"]
        # mid-way through the output's blocks; SIGTERM where the main thread is (not in the writer thread)
        point = "h5write:40" if sig == signal.SIGKILL else "call=dgex.infer.check_finite:40"
        first = run_paused(args, c.dir, point, sig=sig)
        _killed_leaving(c, first, sig, ".pred.gctx~*.tmp")
        return c.dgex(*args)

    return body


def _BIG_X(c):
    return np.load(c.fx.p("infer_big", "X.npy"))


add("infer", "sigkill-then-rerun", "kill-rerun", "ok", _in_killed(signal.SIGKILL), check=pred_check(X=_BIG_X), slow=True)  # fmt: skip
add("infer", "sigterm-then-rerun", "kill-rerun", "ok", _in_killed(signal.SIGTERM), check=pred_check(X=_BIG_X), slow=True)  # fmt: skip


# --------------------------------------------------------------------------- #
# gpus
# --------------------------------------------------------------------------- #
def gp(c, *extra, gpus=None):
    return c.dgex("gpus", "--lock-dir", c.p("locks"), *extra, env={"DGEX_GPUS": gpus} if gpus is not None else None)


def _stdout_has(*fragments):
    def check(ctx, res):
        miss = [f for f in fragments if f not in res.stdout]
        return f"output lacks {miss}: {res.stdout.strip()[:200]}" if miss else None

    return check


def _gp_none(c):
    if shutil.which("nvidia-smi"):
        raise Skip("nvidia-smi present: GPUs may be visible")
    return gp(c)


add("gpus", "no-gpu", "ok-path", "ok", _gp_none, check=_stdout_has("no GPU visible"))
add("gpus", "two-free-gpus", "ok-path", "ok", lambda c: gp(c, gpus="0,1"), check=_stdout_has("GPU 0: free", "GPU 1: free"))  # fmt: skip


def _gp_leased(c):
    locks = c.p("locks")
    locks.mkdir()
    fd = os.open(locks / "gpu1.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242 somehost\n")
        return gp(c, gpus="0,1")
    finally:
        os.close(fd)


add("gpus", "one-gpu-leased", "ok-path", "ok", _gp_leased, check=_stdout_has("GPU 0: free", "GPU 1: leased by 4242 somehost"))  # fmt: skip
add("gpus", "lock-dir-is-a-file", "gpu-locks", "reject", lambda c: (touch_file(c.p("locks")), gp(c, gpus="0"))[1], msg=("locks",), warn="locks", check=lambda c, r: None)  # fmt: skip


def _gp_other_user(c):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        raise Skip("needs root and setpriv to create a lock file of another user")
    locks = c.p("locks")
    locks.mkdir()
    lock = touch_file(locks / "gpu0.lock", b"4242 otherhost\n")
    os.chown(lock, 65534, 65534)
    lock.chmod(0o600)
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
    return c.dgex("gpus", "--lock-dir", locks, env={"DGEX_GPUS": "0"}, prefix=prefix)


add("gpus", "lock-file-of-another-user", "gpu-locks", "reject", _gp_other_user, msg=("gpu0.lock",), warn="gpu0.lock", check=lambda c, r: None)  # fmt: skip


# --------------------------------------------------------------------------- #
# the workflow
# --------------------------------------------------------------------------- #
def wf_config(c, name="rt", results=None, **sections) -> dict:
    """A complete tiny config (about a minute end to end); ``sections`` replace/merge top-level keys."""
    cfg = {
        "name": name,
        "results_dir": str(results or c.p("results")),
        "resources_dir": str(c.p("resources")),
        "demo": {"seed": 0, "n_geo": 60, "n_duplicates": 4, "n_1000g": 12, "n_gtex": 12, "n_latent": 3, "noise": 0.25},
        "inputs": {"geo": {"source": "demo"}, "g1000": {"source": "demo"}, "gtex": {"source": "demo"}},
        "genes": {"max_targets": 20, "parts": 2},
        "preprocess": {"dedup_clusters": 4, "chunk_size": 32},
        "grid": {"layers": [1], "units": [8], "dropout": [0.0]},
        "train": {"epochs": 2, "monitor_size": 20, "device": "cpu", "threads": 1},
        "baselines": {"methods": ["lr"], "threads": 1},
        "interpret": {"s2": False, "s3": True},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_cfg(c, cfg, name="config.yaml") -> Path:
    path = c.p(name)
    path.write_text(yaml.safe_dump(cfg) if not isinstance(cfg, str) else cfg)
    c.logs_dirs.append(Path(cfg["results_dir"], cfg.get("name", "rt"), "logs") if isinstance(cfg, dict) and "results_dir" in cfg else c.dir)  # fmt: skip
    return path


def dry(c, cfg, *extra):
    return c.smk("-n", "--configfile", write_cfg(c, cfg), *extra)


def _without(key):
    def make(c):
        cfg = wf_config(c)
        cfg.pop(key)
        return cfg

    return make


def wf_dry(name, make, msg, expect="wf-fail", **kw):
    add("workflow", name, kw.pop("cls", "bad-config"), expect, lambda c: dry(c, make(c)), msg=msg, **kw)


wf_dry("unknown-top-level-key", lambda c: {**wf_config(c), "typo_key": 1}, ("typo_key",))
wf_dry("misspelled-nested-key", lambda c: wf_config(c, train={"epoch": 3}), ("epoch",))
wf_dry("layers-is-a-string", lambda c: wf_config(c, grid={"layers": "1"}), ("layers",))
wf_dry("epochs-is-text", lambda c: wf_config(c, train={"epochs": "ten"}), ("epochs",))
wf_dry("units-zero", lambda c: wf_config(c, grid={"units": [0]}), ("units",))
wf_dry("layers-empty", lambda c: wf_config(c, grid={"layers": []}), ("layers",))
wf_dry("dropout-one", lambda c: wf_config(c, grid={"dropout": [1.0]}), ("dropout",))
wf_dry("max-targets-one", lambda c: wf_config(c, genes={"max_targets": 1}), ("max_targets",))
wf_dry("device-bogus", lambda c: wf_config(c, train={"device": "tpu"}), ("device",))
wf_dry("name-missing", _without("name"), ("name",), cls="config-layering")
wf_dry("geo-input-missing", lambda c: {**wf_config(c), "inputs": {"g1000": None, "gtex": None}}, ("geo",), cls="config-layering")  # fmt: skip
wf_dry("geo-input-null", lambda c: wf_config(c, inputs={"geo": None, "g1000": None, "gtex": None}), ("geo",))
wf_dry("name-escapes-results", lambda c: wf_config(c, name=".."), ("name",), cls="path-escape")
wf_dry("name-is-dot", lambda c: wf_config(c, name="."), ("name",), cls="path-escape")
wf_dry("name-with-slash", lambda c: wf_config(c, name="a/../../b"), ("name",), cls="path-escape")
wf_dry("url-names-parent-folder", lambda c: wf_config(c, inputs={"geo": {"source": "url", "url": "https://example.org/data/.."}, "g1000": None, "gtex": None}), ("url",), cls="path-escape")  # fmt: skip
wf_dry("geo-path-missing", lambda c: wf_config(c, inputs={"geo": {"source": "path", "path": str(c.p("nope.gctx"))}, "g1000": None, "gtex": None}), ("nope.gctx",), cls="missing-file")  # fmt: skip
wf_dry("url-source-without-url", lambda c: wf_config(c, inputs={"geo": {"source": "url"}, "g1000": None, "gtex": None}), ("url",))  # fmt: skip
wf_dry("path-source-without-path", lambda c: wf_config(c, inputs={"geo": {"source": "path"}, "g1000": None, "gtex": None}), ("path",))  # fmt: skip
wf_dry("sha256-malformed", lambda c: wf_config(c, inputs={"geo": {"source": "url", "url": "https://example.org/x.gctx", "sha256": "xyz"}, "g1000": None, "gtex": None}), ("sha256",))  # fmt: skip
wf_dry("s2-network-not-in-grid", lambda c: wf_config(c, interpret={"s2": True, "s2_network": {"layers": 3, "units": 8, "dropout": 0.0}}), ("s2_network",))  # fmt: skip
wf_dry("s3-without-one-layer-network", lambda c: wf_config(c, grid={"layers": [2]}), ("s3",))
wf_dry("export-1000g-selection-without-rnaseq", lambda c: wf_config(c, inputs={"g1000": None, "gtex": None}, export={"selection": "1000g-va"}), ("selection",))  # fmt: skip
wf_dry("s2-split-without-gtex", lambda c: wf_config(c, inputs={"g1000": None, "gtex": None}, interpret={"s2": True, "s2_split": "gtex-te"}), ("s2_split",))  # fmt: skip
wf_dry("more-parts-than-targets", lambda c: wf_config(c, genes={"max_targets": 20, "parts": 30}), ("parts",))  # fmt: skip


def _missing_configfile(c):
    return c.smk("-n", "--configfile", c.p("nope.yaml"))


add("workflow", "configfile-missing", "missing-file", "wf-fail", _missing_configfile, msg=("nope.yaml",))
add("workflow", "configfile-invalid-yaml", "corrupt-file", "wf-fail", lambda c: c.smk("-n", "--configfile", touch_file(c.p("bad.yaml"), b"name: [unclosed\n  grid: {")), msg=("config file",))  # fmt: skip
add("workflow", "configfile-is-a-list", "wrong-format", "wf-fail", lambda c: c.smk("-n", "--configfile", touch_file(c.p("list.yaml"), b"- 1\n- 2\n")), msg=("config file",))  # fmt: skip


def _partial_config(c):
    cfg = {
        "name": "mine",
        "results_dir": str(c.p("results")),
        "resources_dir": str(c.p("resources")),
        "inputs": {"geo": {"source": "path", "path": str(c.f("demo", "geo.gctx"))}},
    }
    return dry(c, cfg)


def _partial_oracle(ctx, res):
    out = res.stdout + res.stderr
    problems = []
    if "demo_data" in out:
        problems.append("plans demo_data")
    if "--max-targets 1000" in out:
        problems.append("uses the demo's max_targets 1000")
    if "--g1000" in out or "--gtex" in out:
        problems.append("pairs the GEO input with the demo's RNA-seq inputs")
    return "; ".join(problems) or None


add("workflow", "partial-user-config-gets-defaults", "config-layering", "wf-ok", _partial_config, check=_partial_oracle)  # fmt: skip


def _parts_exceed(c):
    return c.smk("--configfile", write_cfg(c, wf_config(c, genes={"max_targets": 20, "parts": 30})))


add("workflow", "more-parts-than-targets-run", "bad-number", "wf-fail", _parts_exceed, msg=("parts",))


def _geo_garbage_run(c):
    garbage(c.p("geo.gctx"))
    cfg = wf_config(c, inputs={"geo": {"source": "path", "path": str(c.p("geo.gctx"))}, "g1000": None, "gtex": None})
    return c.smk("--configfile", write_cfg(c, cfg))


add("workflow", "geo-input-garbage-run", "corrupt-file", "wf-fail", _geo_garbage_run, msg=("geo.gctx",))


def _results_is_file(c):
    touch_file(c.p("results"))
    return c.smk("--configfile", write_cfg(c, wf_config(c)))


add("workflow", "results-dir-is-a-file", "unwritable-output", "wf-fail", _results_is_file, msg=("results",))


# -- runs on a finished tiny workflow (copied from the fixture run)
def wf_base(fx) -> Path:
    """The tiny workflow run to completion once (fixture ``wf_base``, built by :func:`build_wf_base`)."""
    return fx.p("wf_base")


def build_wf_base(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)

    class _C:  # wf_config needs only p()
        def p(self, *parts):
            return path.joinpath(*parts)

    (path / "config.yaml").write_text(yaml.safe_dump(wf_config(_C())))
    res = fx_smk(path, "--configfile", path / "config.yaml")
    (path / "build.log").write_text(res.stdout + res.stderr)
    if res.rc != 0:
        raise RuntimeError(f"tiny workflow fixture failed (exit {res.rc}): {res.stderr[-1500:]}")


def fx_smk(cwd, *args, timeout=900):
    from fixtures import run

    return run([PY, "-m", "snakemake", "--cores", "1", *args], REPO, timeout=timeout)


def from_base(c, moved=False, **sections):
    """Copy the finished fixture run into this case's folder; returns the config (pointing at the copy).

    The run files name the dataset by its path; unless ``moved`` (a results folder moved by its
    user) those are rewritten to the copy's, so that the copy is what a run made here would be.
    """
    base = wf_base(c.fx)
    shutil.copytree(base / "results", c.p("results"), symlinks=True)
    if not moved:
        for path in c.p("results").rglob("*.json"):
            st = path.stat()
            path.write_text(path.read_text().replace(str(base / "results"), str(c.p("results"))))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # keep Snakemake's view of the run
    return wf_config(c, **sections)


RES = ("results", "rt")


def _summary_equals_base(ctx, res):
    a = pd.read_csv(ctx.p(*RES, "aggregate", "summary.csv"))
    b = pd.read_csv(wf_base(ctx.fx) / "results" / "rt" / "aggregate" / "summary.csv")
    if a.shape != b.shape or not np.allclose(a.select_dtypes("number"), b.select_dtypes("number"), equal_nan=True):
        return "aggregate/summary.csv differs from the uninterrupted fixture run"
    if set(a[a["method"] == "D-GEX"]["n_genes"]) != {20}:
        return f"D-GEX rows cover {sorted(set(a['n_genes']))} genes, expected 20"
    return None


def _wf_completes(c):
    base = wf_base(c.fx)
    shutil.copytree(base / "results", c.p("results"), symlinks=True)
    res = c.smk("-n", "--configfile", write_cfg(c, wf_config(c)))
    res.stdout += (base / "build.log").read_text()
    return res


def _wf_complete_oracle(ctx, res):
    if "Nothing to be done" not in res.stdout + res.stderr:
        return "a dry run on the finished (copied) run still plans jobs"
    bad = _summary_equals_base(ctx, res)
    if bad:
        return bad
    for f in ("tables/table1.csv", "figures/figure1.png", "model/bundle.json", "interpret/s3/s3.json"):
        if not ctx.p(*RES, f).is_file():
            return f"missing {f}"
    return None


add("workflow", "tiny-run-completes", "ok-path", "wf-ok", _wf_completes, check=_wf_complete_oracle, slow=True, timeout=900)  # fmt: skip


def _wf_rerun(prepare, moved=False, **sections):
    def body(c):
        cfg = from_base(c, moved=moved, **sections)
        prepare(c)
        return c.smk("--configfile", write_cfg(c, cfg))

    return body


def _rm(*parts):
    def prep(c):
        p = c.p(*RES, *parts)
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return prep


PART1 = ("runs", "dgex", "1x8_d0", "part1")


def _rm_many(*paths):
    def prep(c):
        for parts in paths:
            _rm(*parts)(c)

    return prep


def _retrained(ctx, res):
    if not ctx.p(*RES, *PART1, "run.json").is_file():
        return "part1 was not trained again"
    return _summary_equals_base(ctx, res)


# Snakemake keeps finished downstream outputs when an intermediate is deleted (as for temp files), so the
# outputs built from the part go too: then the deleted part must be retrained, to the same numbers.
DOWNSTREAM = [("aggregate",), ("tables",), ("figures",), ("model",), ("interpret",)]
add("workflow", "deleted-part-run-is-retrained", "deleted-run", "wf-ok", _wf_rerun(_rm_many(PART1, *DOWNSTREAM)), check=_retrained, slow=True, timeout=900)  # fmt: skip
add("workflow", "deleted-run-json-is-retrained", "deleted-run", "wf-ok", _wf_rerun(_rm_many((*PART1, "run.json"), *DOWNSTREAM)), check=_retrained, slow=True, timeout=900)  # fmt: skip
add("workflow", "moved-results-then-part-retrained", "deleted-run", "wf-ok", _wf_rerun(_rm_many(PART1, *DOWNSTREAM), moved=True), check=_retrained, slow=True, timeout=900)  # fmt: skip
add("workflow", "corrupt-run-json-between-runs", "corrupt-file", "wf-fail", _wf_rerun(lambda c: garbage(c.p(*RES, *PART1, "run.json"), 200)), msg=("run.json",), slow=True, timeout=900)  # fmt: skip
add("workflow", "truncated-dataset-between-runs", "truncated-file", "wf-fail", _wf_rerun(lambda c: truncate_copy(c.p(*RES, "data", "dataset.h5"), c.p(*RES, "data", "dataset.h5"), 0.5)), msg=("dataset.h5",), slow=True, timeout=900)  # fmt: skip
# geo-va has 6 profiles, fewer than the 8 hidden units + 1: no adjusted R² can be computed at all
add("workflow", "s2-on-too-few-profiles-is-reported", "optional-analysis", "wf-ok", _wf_rerun(lambda c: None, interpret={"s2": True, "s2_split": "geo-va", "s3": True}), check=lambda c, r: None if c.p(*RES, "interpret", "s2", "s2.json").is_file() else "no interpret/s2/s2.json", slow=True, timeout=900)  # fmt: skip


def _other_split(c):
    """An interrupted part run (last.ckpt of split seed 0), then the config changes the split seed."""
    cfg = from_base(c, preprocess={"split_seed": 1})
    run_dir = c.p(*RES, "runs", "dgex", "1x8_d0", "part0")
    shutil.rmtree(run_dir)
    first = c.dgex(*train_argv(c.f("ds.h5"), run_dir, epochs=1, extra=("--keep-last", "--checkpoint-interval", "0")))
    if first.rc != 0:
        raise RuntimeError(first.stderr[-500:])
    (run_dir / "run.json").unlink()  # interrupted: no run.json
    _rm_many(("data", "dataset.h5"), *DOWNSTREAM)(c)  # what the changed split_seed makes Snakemake redo
    ref = c.dgex(*train_argv(c.f("ds_split1.h5"), "ref"))  # what a fresh run on the new split gives
    if ref.rc != 0:
        raise RuntimeError(ref.stderr[-500:])
    return c.smk("--configfile", write_cfg(c, cfg))


add("workflow", "checkpoint-of-other-split-restarts", "mismatched-inputs", "wf-ok", _other_split, check=_per_gene_equal(Path(*RES, "runs", "dgex", "1x8_d0", "part0"), lambda c: c.p("ref")), slow=True, timeout=900)  # fmt: skip


def _wf_killed(sig, tree, unlock=False):
    def body(c):
        cfg = wf_config(c)
        path = write_cfg(c, cfg)
        argv = [PY, "-m", "snakemake", "--cores", "1", "--configfile", path]
        runs = c.p(*RES, "runs", "dgex")
        first = run_killed(argv, REPO, glob_exists(runs, "history.csv"), sig=sig, tree=tree, timeout=600)
        try:
            if first.rc == 0:
                raise Skip("the workflow finished before it could be killed")
            c.notes.append(f"first run killed: exit {first.rc}")
            recover = unlock
            if sig == signal.SIGKILL and not unlock:
                # the killed Snakemake's lock stays: the same command must refuse, pointing at --unlock
                # (README "When things go wrong"), and then the documented recovery must complete
                again = c.smk("--configfile", path)
                if again.rc == 0 or "--unlock" not in again.stdout + again.stderr:
                    return again  # completed without the recovery, or failed otherwise: judged as it is
                c.notes.append("rerun refused by Snakemake's lock, as documented; unlocked")
                recover = True
            if recover:  # what Snakemake's LockException asks for
                fx_smk(REPO, "--unlock", "--configfile", path)
            return c.smk("--configfile", path)
        finally:
            fx_smk(REPO, "--unlock", "--configfile", path)

    return body


add("workflow", "sigkill-everything-then-rerun", "kill-rerun", "wf-ok", _wf_killed(signal.SIGKILL, True), check=_summary_equals_base, slow=True, timeout=900)  # fmt: skip
add("workflow", "sigkill-everything-unlock-then-rerun", "kill-rerun", "wf-ok", _wf_killed(signal.SIGKILL, True, unlock=True), check=_summary_equals_base, slow=True, timeout=900)  # fmt: skip
add("workflow", "sigterm-snakemake-then-rerun", "kill-rerun", "wf-ok", _wf_killed(signal.SIGTERM, False), check=_summary_equals_base, slow=True, timeout=900)  # fmt: skip


# --------------------------------------------------------------------------- #
# the quick subset run by tests/test_redteam.py: every issue-11 item and the main fault classes
# --------------------------------------------------------------------------- #
SMOKE = {
    "workflow/partial-user-config-gets-defaults",  # 1
    "train/resume-on-other-split",  # 2
    "preprocess/disk-full",  # 3
    "infer/disk-full-gctx",
    "train/read-only-filesystem",
    "infer/output-parent-is-a-file",
    "preprocess/stale-temp-files-of-dead-run",  # 4
    "infer/stale-temp-file-of-dead-run",
    "train/resume-truncated-checkpoint",  # 5
    "preprocess/geo-tsv-duplicate-sample-names",  # 6
    "infer/input-duplicate-samples-csv",
    "infer/bundle-checksum-entry-removed",  # 7
    "infer/bundle-part-without-target-start",
    "train/dataset-holds-nan",  # 8
    "preprocess/geo-constant-landmark",
    "infer/output-extension-contradicts-format",
    "workflow/name-escapes-results",
    "aggregate/only-part-0-of-two",  # 9
    "interpret/s2-fewer-samples-than-landmarks",  # 11 (the CLI side)
    "preprocess/geo-nan",  # classes that work today
    "preprocess/geo-truncated-half",
    "preprocess/geo-as-tsv-equals-gctx",
    "infer/ensembl-ids-predict-correctly",
    "infer/input-missing-landmarks-imputed",
    "infer/input-linear-scale",
    "baseline/lr-matches-least-squares",
    "workflow/unknown-top-level-key",
    "train/second-train-on-a-busy-run-folder",  # the run-folder lock (a rerun racing a live job)
}
_ids = {c.id for c in CASES}
assert _ids >= SMOKE, sorted(SMOKE - _ids)
for _c in CASES:
    _c.smoke = _c.id in SMOKE
