"""Expression-matrix input/output (GCTX, GCT, TSV) and atomic file writes.

Orientation convention used everywhere in dgex: arrays are
``(n_samples, n_genes)``.  This is also how GCTX stores its matrix on disk
(HDF5 dataset ``/0/DATA/0/matrix`` of shape ``(n_columns, n_rows)`` =
``(samples, genes/probes)``), so a block of samples is one contiguous read.

GCTX is read and written with plain h5py: cmapPy's writer breaks on numpy 2
and its parser on pandas 3, so dgex does not depend on it at run time.  The
layout is cmapPy's, and the tests check round trips against cmapPy in both
directions in the pinned environment (numpy<2, pandas<3).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gzip
import io
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .errors import InputError, StorageError

log = logging.getLogger(__name__)

MATRIX = "0/DATA/0/matrix"
ROW_META = "0/META/ROW"
COL_META = "0/META/COL"
GCTX_VERSION = "GCTX1.0"


# --------------------------------------------------------------------------- #
# storage errors, temporary files and atomic writes
# --------------------------------------------------------------------------- #
# Every output is written under a temporary name next to it and renamed into
# place when complete.  The name carries the host and process id
# (``.<name>~<host>~<pid>.<kind>``), so that the next run writing the same
# output can tell the leftovers of a killed run (SIGKILL, power loss) from the
# files of a run still in progress, and remove them.

#: This host as it appears in temporary names (a shared file system may serve several hosts).
HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "localhost"
#: Temporary files of another host are removed once untouched this long (their owner cannot be asked).
STALE_AGE_S = 7 * 24 * 3600
#: A process that started this long after a temporary file was last written cannot be its writer
#: (its pid was reused); generous, because a network file system stamps files with its own clock.
PID_REUSE_SLACK_S = 60.0
#: Temporary paths this process is writing now (pid reuse within one process is no leftover).
_ACTIVE: set[str] = set()

#: Cause and fix of the OS errors an output can meet, for one-line messages.
_CAUSES = {
    errno.ENOSPC: ("no space left on device", "free space there or write to another location, then rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or write to another location, then rerun"),
    errno.EROFS: ("read-only file system", "choose an output location on a writable file system"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to, or fix its permissions"),
    errno.EISDIR: ("is a directory", "remove it or choose another output name"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter output name"),
    errno.EFBIG: (
        "file too large (for the file system, or the process's file size limit)",
        "write to another file system or raise the limit (ulimit -f)",
    ),
    errno.EIO: ("input/output error", "check the disk (or network file system), then rerun"),
}


def _file_in_the_way(path: Path) -> Path | None:
    """The first component of ``path`` (from the root) that exists but is not a folder, if any."""
    for p in reversed([path, *path.parents]):
        if os.path.lexists(p) and not p.is_dir():
            return p
    return None


def describe_os_error(exc: OSError, path=None, what: str = "") -> str:
    """One line ``<path>: <cause>; <fix>`` for an OS error met while writing ``path``.

    ``path`` defaults to the error's own file name; ``what`` names the file
    actually written when it is not ``path`` itself (e.g. a temporary work file).
    """
    if path is None and not exc.filename:
        cause, fix = _CAUSES.get(exc.errno, (exc.strerror or str(exc), "check the path, then rerun"))
        return f"{cause}; {fix}"
    path = Path(path if path is not None else exc.filename)
    code = exc.errno
    if code in (errno.ENOTDIR, errno.EEXIST, errno.ENOENT):
        blocker = _file_in_the_way(path if code == errno.EEXIST else path.parent)
        if blocker is not None:
            return (
                f"{blocker}: is a file, not a folder (needed for {path}); "
                f"remove or rename it, or choose another output location"
            )
    if code in (errno.EEXIST, errno.ENOTDIR) and path.is_dir():
        code = errno.EISDIR
    cause, fix = _CAUSES.get(code, (exc.strerror or str(exc), "check the path, then rerun"))
    return f"{path}: {cause}{f' (writing {what})' if what else ''}; {fix}"


def storage_error(exc: OSError, path=None, what: str = "") -> StorageError:
    """:class:`StorageError` with the one-line description of ``exc`` (see :func:`describe_os_error`)."""
    err = StorageError(describe_os_error(exc, path, what))
    err.errno = exc.errno
    return err


def temp_path(path: str | os.PathLike, kind: str = "tmp") -> Path:
    """The temporary name of ``path`` for this process: ``.<name>~<host>~<pid>.<kind>`` in the same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}~{HOST}~{os.getpid()}.{kind}")


def _temp_pattern(name: str) -> re.Pattern:
    # also the names of dgex versions before host names were added: .<name>.<pid>.<kind>
    return re.compile(rf"\.{re.escape(name)}(?:~(?P<host>[A-Za-z0-9.-]+)~|\.)(?P<pid>\d+)\.(?:tmp|work\.h5|old)")


@lru_cache(maxsize=1)
def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid``, where ``/proc`` tells it."""
    boot = _boot_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if boot is None else boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(host: str | None, pid: int, mtime: float) -> bool:
    """Whether the writer of a temporary file (``host``, ``pid``, last written at ``mtime``) may still run."""
    if host is not None and host != HOST:
        return time.time() - mtime < STALE_AGE_S
    if pid < 1 or pid == os.getpid():
        return False  # our own pid, but not one of our active files: a dead run's pid, reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # e.g. another user's process: alive
    started = _process_start(pid)
    return started is None or started <= mtime + PID_REUSE_SLACK_S


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that dead runs left for ``path``; returns them.

    A leftover is a sibling named like :func:`temp_path` of ``path`` whose
    writer is gone: on this host its pid is not running (or runs a process
    started after the file was last written); from another host, untouched
    for :data:`STALE_AGE_S`.
    """
    path = Path(path)
    pattern, prefix = _temp_pattern(path.name), f".{path.name}"
    removed = []
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or entry.path in _ACTIVE:
            continue
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if _owner_alive(m["host"], int(m["pid"]), mtime):
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
        log.info(
            "removed %s, left behind by an interrupted run (pid %s on %s)", entry.path, m["pid"], m["host"] or HOST
        )
    return removed


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create folder ``path`` (and its parents); a one-line :class:`StorageError` if that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, path) from None
    return path


def check_output_path(path: str | os.PathLike) -> None:
    """Fail fast, before hours of work, when the output file ``path`` cannot be written.

    A folder at ``path``, a file where a parent folder must be, a read-only
    file system or a folder without write permission: one-line :class:`StorageError`.
    """
    path = Path(path)
    code = None
    if path.is_dir():
        code = errno.EISDIR
    elif _file_in_the_way(path.parent) is not None:
        code = errno.ENOTDIR
    else:
        folder = next(p for p in [path.parent, *path.parent.parents] if p.is_dir())
        with contextlib.suppress(OSError):
            if os.statvfs(folder).f_flag & os.ST_RDONLY:
                code = errno.EROFS
            elif not os.access(folder, os.W_OK | os.X_OK):
                code = errno.EACCES
    if code is not None:
        raise storage_error(OSError(code, os.strerror(code)), path)


def _overwrites(out: Path, inp: Path) -> bool:
    """Whether writing ``out`` (a file, or a folder replaced as a whole) would overwrite or delete ``inp``."""
    with contextlib.suppress(OSError):
        if os.path.samefile(out, inp):  # also hard links and other spellings of one file
            return True
    o, i = out.resolve(), inp.resolve()
    return i == o or o in i.parents


def refuse_overwriting_inputs(outputs, inputs: dict, option: str = "--output") -> None:
    """Refuse a command whose output would overwrite or delete one of its own inputs, before any work.

    ``outputs``: the paths the command writes (files, or folders it replaces as a
    whole); ``inputs``: ``{option: path or list of paths}`` of what it reads.
    """
    for out in map(Path, outputs):
        for label, paths in inputs.items():
            for inp in [paths] if isinstance(paths, (str, os.PathLike)) else (paths or []):
                if inp is None or str(inp) == "":
                    continue
                if _overwrites(out, Path(inp)):
                    raise InputError(
                        f"{out}: is (or holds) the input {label} {inp}; writing it would destroy that input; "
                        f"choose another {option}"
                    )


def _begin_temp(path: Path, kind: str, is_dir: bool = False) -> Path:
    """Prepare writing ``path`` under a temporary name: parent folder, leftovers swept, name registered."""
    ensure_dir(path.parent)
    if not is_dir and path.is_dir():
        raise storage_error(OSError(errno.EISDIR, os.strerror(errno.EISDIR)), path)
    sweep_stale(path)
    tmp = temp_path(path, kind)
    _ACTIVE.add(str(tmp))
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed, so a failed or interrupted
    writer never leaves a file that looks complete; an ``OSError`` while
    writing (disk full, read-only, no permission, ...) becomes a one-line
    :class:`StorageError` naming ``path``.  Leftovers of killed runs are
    removed first (:func:`sweep_stale`).
    """
    path = Path(path)
    tmp = _begin_temp(path, "tmp")
    with _publishing(tmp, path):
        yield tmp
        os.replace(tmp, path)


@contextlib.contextmanager
def _publishing(tmp: Path, path: Path) -> Iterator[None]:
    """Guard the filling of ``tmp`` and its rename onto ``path``.

    An OS error becomes a :class:`StorageError` naming ``path``; on any failure
    ``tmp`` is removed; either way it is no longer an active temporary name.
    """
    try:
        try:
            yield
        except OSError as exc:
            if exc.errno is None:  # not an OS-level failure (e.g. an HDF5 format error): keep it as it is
                raise
            raise storage_error(exc, path) from None
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _ACTIVE.discard(str(tmp))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder next to ``path``; on success it replaces ``path`` (see :func:`atomic_path`)."""
    path = Path(path)
    tmp = _begin_temp(path, "tmp", is_dir=True)
    with _publishing(tmp, path):
        _remove(tmp)
        tmp.mkdir()
        yield tmp
        _replace_dir(tmp, path, overwrite)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Write a set of output files into ``folder`` all or nothing: yield a hidden staging folder inside it.

    The caller writes its files into the yielded folder; on success each is
    renamed into ``folder`` (same file system: the staging folder lives inside
    it, which may be a mount point), on any error the staging folder and what
    it holds are removed, so a failed command (disk full halfway) leaves none
    of its outputs.  Errors name the final file, not the staging copy; other
    files in ``folder`` are left alone.
    """
    folder = ensure_dir(folder)
    stage = _begin_temp(folder / folder.name, "tmp", is_dir=True)  # .<name>~<host>~<pid>.tmp, swept if stale
    try:
        try:
            _remove(stage)
            stage.mkdir()
            yield stage
            for f in sorted(stage.iterdir()):  # sorted: a run folder's run.json comes after its other files
                os.replace(f, folder / f.name)
        except OSError as exc:
            if exc.errno is None:
                raise
            raise storage_error(exc, folder / Path(exc.filename).name if exc.filename else folder) from None
        except StorageError as exc:  # raised by an atomic write inside the staging folder
            raise StorageError(str(exc).replace(str(stage), str(folder))) from None
    finally:
        _remove(stage)
        _ACTIVE.discard(str(stage))


def _replace_dir(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder ``tmp`` onto ``output`` (an existing one is moved aside, then removed)."""
    old = None
    if os.path.lexists(output):
        if not overwrite:
            raise InputError(f"{output} exists; pass --overwrite to replace it")
        old = temp_path(output, "old")
        _ACTIVE.add(str(old))
        _remove(old)
        os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        if old is not None:  # put the previous one back
            with contextlib.suppress(OSError):
                os.replace(old, output)
        raise
    finally:
        if old is not None:
            _remove(old)
            _ACTIVE.discard(str(old))


# --------------------------------------------------------------------------- #
# HDF5 files written through a guard
# --------------------------------------------------------------------------- #
# HDF5 (2.0, bundled with h5py 3.16) cannot recover from a failed write: after
# a failed flush it cannot close the file ("slist already enabled"), a failed
# close frees the file's shared state while dataset ids still point into it,
# and h5py's clean-up of those ids (at the latest at interpreter exit) then
# crashes the process with SIGSEGV.  So dgex writes HDF5 through a Python file
# object (h5py's ``fileobj`` driver) that never lets a write fail inside HDF5:
# the first OS error is recorded and later writes go to memory (small ones,
# which HDF5 may read back) or nowhere, so that HDF5 stays consistent and can
# always be closed; dgex then raises the recorded error itself (after each
# block written, and before a file is renamed into place) and deletes the file.

#: Writes up to this size are kept in memory after a failure (HDF5 metadata it may read back) ...
_OVERLAY_WRITE_MAX = 1 << 20
#: ... up to this much in total; larger writes are raw data that HDF5 never needs again.
_OVERLAY_TOTAL_MAX = 256 << 20


#: h5py's own Python code: not safe against an exception at any line (bare ``except:``, half-made objects).
_H5PY_DIR = os.path.dirname(h5py.__file__) + os.sep


def hdf5_busy(frame) -> bool:
    """Whether ``frame`` (where a signal handler interrupted) is inside HDF5 work that must not be interrupted.

    That is h5py's Python code (not safe against an exception at any line),
    dgex's file callbacks (an exception there fails a write inside HDF5,
    which cannot recover) and the opening and closing of dgex's HDF5 files.
    A signal handler must not raise there, but deliver the signal again a
    moment later.
    """
    while frame is not None:
        if frame.f_code in _PROTECTED_CODES or frame.f_code.co_filename.startswith(_H5PY_DIR):
            return True
        frame = frame.f_back
    return False


class _HDF5Sink(io.FileIO):
    """The OS file under an HDF5 file being written; its writes never fail inside HDF5 (see above).

    :attr:`error` is the first ``OSError`` met; from then on nothing more
    reaches the disk and the file must be abandoned.
    """

    def __init__(self, path: Path):
        super().__init__(path, "w+")
        self.error: OSError | None = None
        self._overlay: list[tuple[int, bytes]] = []
        self._overlay_bytes = 0

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        size = view.nbytes
        if self.error is None:
            start = self.tell()
            try:
                self._write_all(view)
                return size
            except OSError as exc:
                self.error = exc
                self.seek(start)
        if size <= _OVERLAY_WRITE_MAX and self._overlay_bytes + size <= _OVERLAY_TOTAL_MAX:
            self._overlay.append((self.tell(), bytes(view)))
            self._overlay_bytes += size
        self.seek(size, os.SEEK_CUR)
        return size

    def _write_all(self, view: memoryview) -> None:
        while view.nbytes:  # FileIO writes less than asked when the disk is nearly full
            view = view[super().write(view) :]

    def readinto(self, b) -> int:
        # h5py's driver ignores short reads: fill the whole buffer (zeros past the end, as HDF5's own driver)
        view = memoryview(b).cast("B")
        start, got = self.tell(), 0
        try:
            while got < view.nbytes:
                n = super().readinto(view[got:])
                if not n:
                    break
                got += n
        except OSError as exc:
            self.error = self.error or exc
        view[got:] = bytes(view.nbytes - got)
        end = start + view.nbytes
        for offset, data in self._overlay:  # in write order: later writes win
            lo, hi = max(start, offset), min(end, offset + len(data))
            if lo < hi:
                view[lo - start : hi - start] = data[lo - offset : hi - offset]
        self.seek(end)
        return view.nbytes

    def truncate(self, size=None):
        if self.error is None:
            try:
                return super().truncate(size)
            except OSError as exc:
                self.error = exc
        return size

    def flush(self) -> None:
        pass  # unbuffered


#: HDF5 files open for writing; any still open at exit are abandoned while Python can still serve their
#: callbacks (HDF5's own exit handler would flush them into a finalised interpreter: SIGSEGV).
_OPEN_H5: dict[int, tuple[h5py.File, _HDF5Sink]] = {}


def _open_h5(tmp: Path) -> tuple[h5py.File, _HDF5Sink]:
    sink = _HDF5Sink(tmp)
    try:
        h5 = h5py.File(sink, "w")
    except BaseException:
        sink.close()
        raise
    h5._dgex_sink = sink  # for check_written
    _OPEN_H5[id(sink)] = (h5, sink)
    return h5, sink


@atexit.register
def _abandon_open_h5() -> None:
    for h5, sink in list(_OPEN_H5.values()):
        with contextlib.suppress(Exception):
            _close_h5(h5, sink, commit=False)
        _remove(Path(sink.name))


def check_written(h5: h5py.File) -> None:
    """Raise the ``OSError`` that spoilt an HDF5 file opened by :func:`atomic_h5` / :func:`scratch_h5`, if any."""
    sink = getattr(h5, "_dgex_sink", None)
    if sink is not None and sink.error is not None:
        raise sink.error


def _close_h5(h5: h5py.File, sink: _HDF5Sink, commit: bool) -> None:
    """Close an HDF5 file opened by :func:`_open_h5`; with ``commit``, raise the write error that spoilt it."""
    if not commit and sink.error is None:
        sink.error = OSError("abandoned")  # nothing more needs to reach the disk
    try:
        h5.close()  # cannot fail on I/O: the sink takes every write
    finally:
        sink.close()
        _OPEN_H5.pop(id(sink), None)
    if commit and sink.error is not None:
        raise sink.error


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Create the HDF5 file ``path`` atomically (see :func:`atomic_path`); I/O errors never crash HDF5."""
    with atomic_path(path) as tmp:
        h5, sink = _open_h5(tmp)
        try:
            yield h5
        except BaseException:
            _close_h5(h5, sink, commit=False)
            raise
        _close_h5(h5, sink, commit=True)


@contextlib.contextmanager
def scratch_h5(path: str | os.PathLike, kind: str = "work.h5") -> Iterator[h5py.File]:
    """A temporary HDF5 work file next to ``path`` (named by :func:`temp_path`), always deleted afterwards.

    Call :func:`check_written` after writing to it: a failed write becomes a
    :class:`StorageError` naming ``path``; other errors of the body pass unchanged.
    """
    path = Path(path)
    tmp = _begin_temp(path, kind)
    what = f"its temporary work file {tmp.name}"
    try:
        try:
            h5, sink = _open_h5(tmp)
        except OSError as exc:
            raise storage_error(exc, path, what) from None
        try:
            yield h5
        except OSError as exc:
            if exc is sink.error and exc.errno is not None:
                raise storage_error(exc, path, what) from None
            raise
        finally:
            _close_h5(h5, sink, commit=False)
    finally:
        _remove(tmp)
        _ACTIVE.discard(str(tmp))


class _TorchSink:
    """The file ``torch.save`` writes to: it never sees a failed write, the first ``OSError`` is kept.

    torch's zip writer turns an exception of a Python file's ``write`` into an opaque
    ``RuntimeError`` ("unexpected pos ..."); so writes after a failure are dropped and
    :func:`save_torch` raises the recorded error itself.
    """

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, b) -> int:
        view = memoryview(b).cast("B")
        if self.error is None:
            try:
                while view.nbytes:  # an unbuffered file writes less than asked when the disk is nearly full
                    view = view[self.fh.write(view) :]
            except OSError as exc:
                self.error = exc
        return memoryview(b).nbytes

    def flush(self) -> None:
        pass  # unbuffered


def save_torch(obj, path: str | os.PathLike, atomic: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` (atomically unless ``atomic`` is false).

    Written through a Python file, so that a full disk raises ``OSError``
    (torch's own file writer raises an opaque ``RuntimeError``) and the archive
    inside is named ``archive`` whatever the (temporary) file name: the bytes
    do not depend on the process id.
    """
    import torch  # only the stages that save networks pay for the import

    def save(target: Path) -> None:
        with open(target, "wb", buffering=0) as fh:
            sink = _TorchSink(fh)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
            if sink.error is not None:
                raise sink.error

    if not atomic:
        save(Path(path))
        return
    with atomic_path(path) as tmp:
        save(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, np.generic):  # numpy integers, floats and bools
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def check_unique(ids: Sequence[str], what: str, path) -> None:
    """Raise :class:`InputError` if ``ids`` has duplicates."""
    ids = pd.Index(ids)
    if not ids.is_unique:
        dup = ids[ids.duplicated()].unique()
        raise InputError(
            f"{path}: {len(dup)} duplicate {what} id(s), e.g. {', '.join(map(str, dup[:5]))}; "
            f"make the {what} ids unique (e.g. average or drop repeated {what}s) and retry"
        )


def check_finite(block: np.ndarray, sample_ids: Sequence[str], path) -> None:
    """Raise :class:`InputError` naming the first samples that hold NaN or Inf.

    ``block`` is ``(n_samples, n_genes)``.
    """
    bad_rows = ~np.isfinite(block).all(axis=1)
    if bad_rows.any():
        names = [str(sample_ids[i]) for i in np.flatnonzero(bad_rows)[:5]]
        raise InputError(
            f"{path}: {int(bad_rows.sum())} sample(s) contain NaN or Inf values "
            f"(e.g. {', '.join(names)}); remove or impute those samples and retry"
        )


#: Log2 expression stays below this; larger values mean a linear scale.
MAX_LOG2_VALUE = 30.0


def check_scale(block: np.ndarray, path, linear_fix: str, ratio_fix: str) -> None:
    """Reject values that are clearly not log2 expression; ``block`` is ``(n_samples, n_genes)``.

    ``linear_fix`` / ``ratio_fix``: how the caller's user fixes linear-scale
    values / z-scores or log ratios (the message's last clause).
    """
    top = float(np.nanmax(block)) if block.size else 0.0
    if top > MAX_LOG2_VALUE:
        raise InputError(
            f"{path}: values up to {top:.4g} look linear-scale, expected log2 expression (~2-16); {linear_fix}"
        )
    med = float(np.nanmedian(block)) if block.size else 1.0
    if med < 1.0:
        raise InputError(
            f"{path}: median value {med:.3g} looks like z-scores or log ratios, expected log2 "
            f"expression (~2-16); {ratio_fix}"
        )


#: A profile varying less than this (s.d. across genes, log2 units) is flat: a failed array, no
#: expression information (real HG-U133A / L1000 profiles have s.d. 1.5-2.5).
FLAT_SAMPLE_STD = 0.1
#: A gene varying less than this (s.d. across samples, log2 units) is constant (real genes: >= 0.15).
CONSTANT_GENE_STD = 1e-3


def flat_samples(block: np.ndarray) -> np.ndarray:
    """Mask ``(n_samples,)`` of flat profiles in ``block`` ``(n_samples, n_genes)`` (see :data:`FLAT_SAMPLE_STD`)."""
    if block.shape[1] < 2:
        return np.zeros(block.shape[0], dtype=bool)
    return block.std(axis=1, dtype=np.float64) < FLAT_SAMPLE_STD


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O"):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values


# --------------------------------------------------------------------------- #
# readers
# --------------------------------------------------------------------------- #
class Matrix:
    """Common read interface of an expression matrix of genes x samples.

    ``row_ids`` are genes/probes, ``col_ids`` are samples.  Data are always
    returned as float32 arrays ``(n_samples, n_genes)``.
    """

    path: Path
    row_ids: np.ndarray
    col_ids: np.ndarray

    @property
    def n_rows(self) -> int:
        """Number of rows (genes or probes)."""
        return len(self.row_ids)

    @property
    def n_cols(self) -> int:
        """Number of columns (samples)."""
        return len(self.col_ids)

    def row_positions(self, ids: Sequence[str], what: str = "row") -> np.ndarray:
        """Positions of ``ids`` among the rows; error listing the ones that are missing."""
        index = pd.Index(self.row_ids)
        pos = index.get_indexer(pd.Index(ids))
        missing = [str(i) for i, p in zip(ids, pos) if p < 0]
        if missing:
            raise InputError(
                f"{self.path}: {len(missing)} of {len(ids)} {what} ids are missing "
                f"(e.g. {', '.join(missing[:8])}); use an input that contains them "
                f"(HG-U133A probe ids for GEO input) or check the id type"
            )
        return pos

    def read(self, rows: np.ndarray | None = None, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Samples ``start:stop`` (all by default) of the selected rows, ``(n_samples, n_rows_sel)``."""
        raise NotImplementedError

    def iter_samples(self, chunk_size: int, rows: np.ndarray | None = None) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, block)`` with ``block`` of shape ``(stop - start, n_rows_sel)``."""
        chunk_size = max(1, int(chunk_size))
        for start in range(0, self.n_cols, chunk_size):
            stop = min(start + chunk_size, self.n_cols)
            yield start, stop, self.read(rows, start, stop)

    def row_meta(self) -> pd.DataFrame:
        """Row metadata (e.g. gene symbols), one row per ``row_ids`` entry, indexed by id."""
        raise NotImplementedError

    def col_meta(self) -> pd.DataFrame:
        """Column metadata (sample annotations), one row per ``col_ids`` entry, indexed by id."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file, if any."""
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class GCTXReader(Matrix):
    """Lazy GCTX reader: ids and metadata up front, data read in sample blocks."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        _check_file(self.path)
        if not h5py.is_hdf5(self.path):
            raise InputError(
                f"{self.path}: not a GCTX file (not HDF5); pass a .gctx file "
                f"(use a .gct/.tsv extension for text matrices)"
            )
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(
                f"{self.path}: corrupt or truncated HDF5 file ({exc}); re-download or regenerate it"
            ) from None
        try:
            for node in (MATRIX, f"{ROW_META}/id", f"{COL_META}/id"):
                if node not in self._h5:
                    raise InputError(
                        f"{self.path}: not a GCTX file (HDF5 node /{node} missing); "
                        f"write it in the CMap GCTX layout (cmapPy write_gctx or dgex.io.write_gctx)"
                    )
            self._data = self._h5[MATRIX]
            self.row_ids = _decode(self._h5[f"{ROW_META}/id"][()])
            self.col_ids = _decode(self._h5[f"{COL_META}/id"][()])
        except InputError:
            self._h5.close()
            raise
        except (OSError, KeyError, ValueError) as exc:
            self._h5.close()
            raise InputError(f"{self.path}: corrupt GCTX file ({exc}); re-download or regenerate it") from None
        shape = self._data.shape
        expected = (len(self.col_ids), len(self.row_ids))
        if shape != expected:
            self._h5.close()
            if shape == expected[::-1]:
                raise InputError(
                    f"{self.path}: matrix is stored in the wrong orientation ({shape[0]} HDF5 rows = genes); "
                    f"GCTX stores samples as HDF5 rows: transpose it and rewrite (dgex.io.write_gctx)"
                )
            raise InputError(
                f"{self.path}: matrix shape {shape} does not match {expected[1]} row ids x "
                f"{expected[0]} column ids; the file is corrupt, regenerate it"
            )
        check_unique(self.row_ids, "row", self.path)
        check_unique(self.col_ids, "column", self.path)

    def read(self, rows=None, start=0, stop=None):
        """Samples ``start:stop`` of the selected rows, read from the HDF5 matrix, ``(n_samples, n_rows_sel)``."""
        stop = self.n_cols if stop is None else stop
        try:
            block = self._data[start:stop, :]
        except (OSError, ValueError) as exc:
            raise InputError(
                f"{self.path}: corrupt or truncated GCTX data ({exc}); re-download or regenerate it"
            ) from None
        block = np.asarray(block, dtype=np.float32)
        return block if rows is None else block[:, rows]

    def _meta(self, node: str, ids: np.ndarray) -> pd.DataFrame:
        group = self._h5[node]
        cols = {k: _decode(group[k][()]) for k in group if k != "id" and group[k].shape == (len(ids),)}
        return pd.DataFrame(cols, index=pd.Index(ids, name="id"))

    def row_meta(self):
        """The GCTX row metadata fields (those with one value per row)."""
        return self._meta(ROW_META, self.row_ids)

    def col_meta(self):
        """The GCTX column metadata fields (those with one value per column)."""
        return self._meta(COL_META, self.col_ids)

    def close(self):
        """Close the HDF5 file (errors while closing are ignored)."""
        with contextlib.suppress(Exception):
            self._h5.close()


class InMemoryMatrix(Matrix):
    """A matrix held in memory (read from GCT/TSV, or built in code)."""

    def __init__(self, data: np.ndarray, row_ids, col_ids, row_meta=None, col_meta=None, path="<memory>"):
        self.path = Path(path) if not isinstance(path, Path) else path
        self.data = np.asarray(data, dtype=np.float32)  # (n_samples, n_genes)
        self.row_ids = np.asarray([str(i) for i in row_ids], dtype=object)
        self.col_ids = np.asarray([str(i) for i in col_ids], dtype=object)
        if self.data.shape != (len(self.col_ids), len(self.row_ids)):
            raise InputError(f"{self.path}: data shape {self.data.shape} does not match the ids")
        check_unique(self.row_ids, "row", self.path)
        check_unique(self.col_ids, "column", self.path)
        self._row_meta = row_meta if row_meta is not None else pd.DataFrame(index=pd.Index(self.row_ids, name="id"))
        self._col_meta = col_meta if col_meta is not None else pd.DataFrame(index=pd.Index(self.col_ids, name="id"))

    def read(self, rows=None, start=0, stop=None):
        """Samples ``start:stop`` of the selected rows, ``(n_samples, n_rows_sel)``."""
        block = self.data[start:stop]
        return block if rows is None else block[:, rows]

    def row_meta(self):
        """The row metadata given at construction (empty, indexed by id, if none)."""
        return self._row_meta

    def col_meta(self):
        """The column metadata given at construction (empty, indexed by id, if none)."""
        return self._col_meta


def _check_file(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found; check the path in your config or command line")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an expression file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file; re-download or regenerate it")


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def read_gct(path: str | os.PathLike) -> InMemoryMatrix:
    """Read a text GCT file (v1.2 or v1.3) into memory."""
    path = Path(path)
    _check_file(path)
    try:
        with _open_text(path) as fh:
            version = fh.readline().strip()
            dims = fh.readline().strip().split("\t")
            if version not in ("#1.2", "#1.3"):
                raise InputError(f"{path}: not a GCT file (first line {version[:20]!r}, expected #1.2 or #1.3)")
            n_row_meta = int(dims[2]) if version == "#1.3" else 1
            n_col_meta = int(dims[3]) if version == "#1.3" else 0
            # no header=0: pandas would rename repeated sample names (A, A.1) instead of letting us reject them
            table = pd.read_csv(fh, sep="\t", header=None, dtype=str, keep_default_na=False)
    except (UnicodeDecodeError, gzip.BadGzipFile, ValueError, IndexError) as exc:
        raise InputError(f"{path}: cannot parse GCT file ({exc}); check the file format") from None
    if table.empty:
        raise InputError(f"{path}: no header line after the dimensions; check the file format")
    header = table.iloc[0].tolist()
    n_lead = 1 + (n_row_meta if version == "#1.3" else 1)
    check_unique(header[n_lead:], "column", path)
    check_unique(header[:n_lead], "annotation column", path)
    df = table.iloc[1:].reset_index(drop=True)
    df.columns = header
    id_col = df.columns[0]
    meta_cols = list(df.columns[1 : 1 + n_row_meta]) if version == "#1.3" else [df.columns[1]]
    sample_cols = list(df.columns[1 + len(meta_cols) :])
    col_meta_rows = df.iloc[:n_col_meta]
    body = df.iloc[n_col_meta:]
    col_meta = pd.DataFrame(
        {r[id_col]: r[sample_cols].values for _, r in col_meta_rows.iterrows()},
        index=pd.Index(sample_cols, name="id"),
    )
    try:
        data = body[sample_cols].replace({"": "nan", "NA": "nan"}).astype(np.float32).to_numpy().T
    except ValueError as exc:
        raise InputError(f"{path}: non-numeric expression values ({exc}); fix the file") from None
    row_meta = body.set_index(id_col)[meta_cols] if version == "#1.3" else None
    return InMemoryMatrix(data, body[id_col].values, sample_cols, row_meta, col_meta, path)


#: Gene annotation columns that may be numeric but are never samples (GEUVADIS, GTEx GCT, ...).
ANNOTATION_COLUMNS = {
    "gene_symbol",
    "symbol",
    "description",
    "name",
    "chr",
    "chrom",
    "chromosome",
    "coord",
    "start",
    "end",
    "stop",
    "strand",
    "length",
    "gene_name",
    "gene_type",
    "entrez",
    "gene_id",
}


def read_tsv(path: str | os.PathLike, id_column: str | int = 0) -> InMemoryMatrix:
    """Read a genes x samples table (TSV/CSV, optionally gzipped).

    The id column is ``id_column``; other non-numeric columns (e.g. GEUVADIS's
    ``Gene_Symbol``, ``Chr``, ``Coord``) become row metadata, numeric columns samples.
    """
    path = Path(path)
    _check_file(path)
    sep = "," if ".csv" in path.suffixes else "\t"
    try:
        df = pd.read_csv(path, sep=sep, low_memory=False)
        # the header as written: pandas renames repeated names (A, A.1), which must be rejected, not
        # confused with a sample really named A.1
        header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]
    except (UnicodeDecodeError, gzip.BadGzipFile, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(
            f"{path}: cannot parse table ({exc}); expected a tab-separated genes x samples table"
        ) from None
    check_unique([h for h in header.tolist() if h.strip()], "column", path)
    id_name = df.columns[id_column] if isinstance(id_column, int) else id_column
    if id_name not in df.columns:
        raise InputError(f"{path}: id column {id_name!r} not found; columns start {list(df.columns[:5])}")
    rest = df.drop(columns=[id_name])
    numeric = [
        c for c in rest.columns if pd.api.types.is_numeric_dtype(rest[c]) and str(c).lower() not in ANNOTATION_COLUMNS
    ]
    meta = [c for c in rest.columns if c not in numeric]
    if not numeric:
        raise InputError(f"{path}: no numeric sample columns found; expected genes as rows and samples as columns")
    data = rest[numeric].to_numpy(dtype=np.float32).T
    row_meta = rest[meta].set_index(df[id_name].astype(str).rename("id"))
    return InMemoryMatrix(data, df[id_name].astype(str).values, numeric, row_meta, None, path)


def open_matrix(path: str | os.PathLike) -> Matrix:
    """Open an expression matrix by extension: ``.gctx`` lazily, ``.gct``/``.tsv``/``.txt``/``.csv`` in memory."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".gctx") or name.endswith(".h5"):
        return GCTXReader(path)
    if name.endswith(".gct"):
        return read_gct(path)
    if name.endswith((".tsv", ".txt", ".csv")):
        return read_tsv(path)
    raise InputError(f"{path}: unknown matrix format; use .gctx, .gct, .tsv, .txt or .csv (optionally .gz)")


# --------------------------------------------------------------------------- #
# writers
# --------------------------------------------------------------------------- #
def _as_hdf5_column(values) -> np.ndarray:
    values = np.asarray(values)
    if values.dtype.kind in ("U", "O", "S"):
        return np.array([str(v).encode() for v in values], dtype="S")
    return values


def _write_meta(h5: h5py.File, node: str, ids, meta: pd.DataFrame | None) -> None:
    group = h5.require_group(node)
    group.create_dataset("id", data=_as_hdf5_column(ids))
    if meta is not None:
        for name in meta.columns:
            group.create_dataset(str(name), data=_as_hdf5_column(meta[name].values))


class GCTXWriter:
    """Stream a GCTX file sample block by sample block, atomically.

    >>> with GCTXWriter(out, row_ids=genes, col_ids=samples) as w:   # doctest: +SKIP
    ...     for block in blocks:          # each (k, n_genes)
    ...         w.write(block)

    The file appears at ``path`` only after every sample was written; a failed
    write (disk full, ...) raises a one-line :class:`StorageError` and the
    temporary file is removed on :meth:`close`.
    """

    def __init__(
        self,
        path,
        row_ids,
        col_ids,
        row_meta: pd.DataFrame | None = None,
        col_meta: pd.DataFrame | None = None,
        compression: str | None = None,
    ):
        self.path = Path(path)
        self.n_rows, self.n_cols = len(row_ids), len(col_ids)
        self._pos = 0
        self._stack = contextlib.ExitStack()
        self._h5 = self._stack.enter_context(atomic_h5(self.path))
        try:
            self._h5.attrs["version"] = GCTX_VERSION
            self._h5.attrs["src"] = self.path.name
            chunk_rows = max(1, min(self.n_cols, (1 << 20) // max(1, self.n_rows)))
            self._data = self._h5.create_dataset(
                MATRIX,
                shape=(self.n_cols, self.n_rows),
                dtype=np.float32,
                chunks=(chunk_rows, self.n_rows) if self.n_cols and self.n_rows else None,
                compression=compression,
            )
            _write_meta(self._h5, ROW_META, row_ids, row_meta)
            _write_meta(self._h5, COL_META, col_ids, col_meta)
        except BaseException as exc:
            self._abort(exc)
            raise self._translated(exc) from None

    def _translated(self, exc: BaseException) -> BaseException:
        if isinstance(exc, OSError) and exc.errno is not None:
            return storage_error(exc, self.path)
        return exc

    def _abort(self, exc: BaseException) -> None:
        """Close and delete the temporary file; ``exc`` is what went wrong."""
        stack, self._stack = self._stack, None
        if stack is not None:
            with contextlib.suppress(BaseException):
                stack.__exit__(type(exc), exc, None)

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` of shape ``(k, n_rows)`` (k samples)."""
        block = np.asarray(block, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.n_rows:
            raise ValueError(f"block shape {block.shape} does not match ({'k'}, {self.n_rows})")
        end = self._pos + block.shape[0]
        if end > self.n_cols:
            raise ValueError(f"writing past the declared {self.n_cols} samples")
        try:
            self._data[self._pos : end] = block
            check_written(self._h5)  # a full disk shows here, at the first block it spoils
        except OSError as exc:
            raise self._translated(exc) from None
        self._pos = end

    def close(self, ok: bool = True) -> None:
        """Rename the finished file into place (``ok``) or delete it; a second call does nothing."""
        if self._stack is None:
            return
        if ok and self._pos != self.n_cols:
            err = ValueError(f"only {self._pos} of {self.n_cols} samples were written")
            self._abort(err)
            raise err
        if not ok:
            self._abort(RuntimeError("abandoned"))
            return
        stack, self._stack = self._stack, None
        stack.close()  # commit: flush, close, rename; a failed write raises StorageError here

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(ok=exc_type is None)


def write_gctx(path, data: np.ndarray, row_ids, col_ids, row_meta=None, col_meta=None, compression=None) -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as GCTX (rows = genes, columns = samples), atomically."""
    data = np.asarray(data, dtype=np.float32)
    with GCTXWriter(path, row_ids, col_ids, row_meta, col_meta, compression) as w:
        w.write(data)


def write_gct(path, data: np.ndarray, row_ids, col_ids) -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as a GCT v1.2 text file, atomically."""
    data = np.asarray(data)
    df = pd.DataFrame(data.T, index=pd.Index(row_ids, name="Name"), columns=list(col_ids))
    df.insert(0, "Description", list(row_ids))
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write(f"#1.2\n{data.shape[1]}\t{data.shape[0]}\n")
        df.to_csv(fh, sep="\t", float_format="%.6g")


def write_tsv(path, data: np.ndarray, row_ids, col_ids, row_meta: pd.DataFrame | None = None, id_name="id") -> None:
    """Write ``data`` ``(n_samples, n_genes)`` as a genes x samples TSV (gzipped if the name ends in .gz)."""
    df = pd.DataFrame(np.asarray(data).T, columns=list(col_ids))
    if row_meta is not None:
        df = pd.concat([row_meta.reset_index(drop=True), df], axis=1)
    df.insert(0, id_name, list(row_ids))
    with atomic_path(path) as tmp:
        df.to_csv(
            tmp, sep="\t", index=False, float_format="%.6g", compression="gzip" if str(path).endswith(".gz") else None
        )


#: Code during which a signal must not raise (see :func:`hdf5_busy`): HDF5's callbacks, and the setting
#: up and tearing down of temporary files, so that an interrupt never leaves one open or behind.
_PROTECTED_CODES = frozenset(
    getattr(f, "__wrapped__", f).__code__
    for f in (
        _HDF5Sink.write,
        _HDF5Sink._write_all,
        _HDF5Sink.readinto,
        _HDF5Sink.truncate,
        _HDF5Sink.flush,
        _open_h5,
        _close_h5,
        _begin_temp,
        _remove,
        _replace_dir,
        sweep_stale,
        atomic_path,
        _publishing,
        atomic_dir,
        atomic_h5,
        scratch_h5,
        GCTXWriter.__init__,
        GCTXWriter._abort,
        GCTXWriter.close,
    )
)
