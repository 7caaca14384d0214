"""GPU leases for training jobs that Snakemake runs side by side.

``snakemake --resources gpu=2`` only caps how many ``gpu=1`` jobs run at once;
it does not tell a job *which* GPU to use.  Each training process therefore
leases a device itself: an exclusive ``fcntl.flock`` on ``gpu<id>.lock`` in a
lock folder, held through an open file descriptor for the life of the
process.  The kernel drops the lock when the process exits, however it exits
(``kill -9`` included), so a lease can never leak.  The leased id goes into
``CUDA_VISIBLE_DEVICES`` before torch initialises CUDA.

Under SLURM the scheduler has already set ``CUDA_VISIBLE_DEVICES`` for the
job: that assignment is kept and nothing is leased.  Without GPUs nothing is
leased and training runs on the CPU.

``DGEX_GPUS`` (comma-separated ids) overrides device discovery, for tests and
for machines where ``nvidia-smi`` is not on PATH.

Lock folders and files are checked before use, because a lease is only as
good as its lock file (a shared temp folder is world-writable):

* The default folder ``<tmp>/dgex-gpu-locks-<uid>`` is private: created
  ``0700``; it must be a real folder (not a symbolic link) owned by this user,
  and lock files in it must be this user's.  A folder left group/world
  writable by this user is tightened to ``0700``; anything else (another
  user's folder, a link, a file) is an error, never used.
* A folder named by ``--gpu-lock-dir`` / ``DGEX_GPU_LOCK_DIR`` may be shared
  between users on purpose (e.g. ``mkdir -m 1777``): another owner is
  accepted; a symbolic link owned by another user is not; a world-writable
  folder without the sticky bit gets a warning (others could delete a held
  lock file, and then two jobs could get one GPU).  A folder that does not
  exist is created ``0700``.
* Lock files are opened without following symbolic links and must be regular
  files; one that is not, or cannot be opened, is an error naming it.  Another
  user's lock file that is read-only to us is locked through a read-only
  descriptor (``flock`` needs no write access), so users still exclude each
  other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)


#: CUDA_VISIBLE_DEVICES as it was before this process's first lease (set by lease_gpu).
_BEFORE_LEASE = "DGEX_CUDA_VISIBLE_DEVICES_BEFORE_LEASE"


def default_lock_dir() -> Path:
    """The folder of GPU lease files: ``$DGEX_GPU_LOCK_DIR``, else a per-user folder in the temporary directory."""
    env = os.environ.get("DGEX_GPU_LOCK_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"dgex-gpu-locks-{os.getuid()}"


_FIX = "pass --gpu-lock-dir or set DGEX_GPU_LOCK_DIR to a folder of your own"


def _lock_dir_error(path: Path, what: str, remove: bool = False) -> ConfigError:
    fix = f"remove it (as its owner or root) or {_FIX}" if remove else _FIX
    return ConfigError(f"GPU lock folder {path} {what}; {fix}")


def prepare_lock_dir(lock_dir=None, create: bool = True) -> tuple[Path, bool]:
    """The checked lock folder (created ``0700`` if absent) and whether it is a private default one.

    ``lock_dir`` (or ``DGEX_GPU_LOCK_DIR``) names a folder chosen by the user, which may be shared
    with other users; without either the private ``<tmp>/dgex-gpu-locks-<uid>`` is used.  Raises
    ConfigError (one line) for a folder that cannot be trusted or written; see the module docstring.
    """
    private = not lock_dir and not os.environ.get("DGEX_GPU_LOCK_DIR")
    path = Path(lock_dir) if lock_dir else default_lock_dir()
    uid = os.getuid()
    if not create and not os.path.lexists(path):
        return path, private  # nothing leased yet (lease_status creates nothing)
    try:
        if not private and not path.parent.is_dir():
            path.parent.mkdir(parents=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    except OSError as e:
        raise _lock_dir_error(path, f"cannot be created ({e.strerror})") from None
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            if private or st.st_uid not in (uid, 0):
                raise _lock_dir_error(
                    path, f"is a symbolic link owned by uid {st.st_uid}: it may point where someone else chose", True
                )
            st = os.stat(path)
    except OSError as e:
        raise _lock_dir_error(path, f"cannot be inspected ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        raise _lock_dir_error(path, "is not a folder", True)
    if private:
        if st.st_uid != uid:
            raise _lock_dir_error(
                path, f"belongs to uid {st.st_uid}, not to you (uid {uid}): its locks cannot be trusted", True
            )
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)  # ours but open to others (older dgex, umask 0): make it private
    elif st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        log.warning(
            "GPU lock folder %s is writable by everyone without the sticky bit: other users can delete a held "
            "lock file, and then two jobs can get the same GPU; chmod +t it",
            path,
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise _lock_dir_error(path, "is not writable (permission denied)")
    return path, private


def _open_lock(path: Path, private: bool, create: bool) -> tuple[int, bool]:
    """A descriptor of the lock file ``path`` and whether it is writable; ConfigError if it cannot be trusted.

    Never follows a symbolic link (one planted in a shared folder would make us truncate its target)
    and never blocks on a FIFO.  A lock file we may only read is opened read-only: flock still works.
    """
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        try:
            fd, writable = os.open(path, flags | os.O_RDWR | (os.O_CREAT if create else 0), 0o644), True
        except PermissionError:
            fd, writable = os.open(path, flags | os.O_RDONLY), False
    except FileNotFoundError:
        if not create:
            raise  # no lock file: nobody holds this GPU
        raise ConfigError(f"GPU lock folder {path.parent} vanished while leasing; {_FIX}") from None
    except OSError as e:
        what = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
        raise ConfigError(f"GPU lock file {path} {what}; remove it (as its owner or root) or {_FIX}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif private and st.st_uid != os.getuid():
        problem = f"belongs to uid {st.st_uid}, not to you, in your private lock folder"
    if problem:
        os.close(fd)
        raise ConfigError(f"GPU lock file {path} {problem}; remove it (as its owner or root) or {_FIX}")
    return fd, writable


def visible_gpus() -> list[str]:
    """Device ids this process may use: ``DGEX_GPUS``, else ``nvidia-smi``, within ``CUDA_VISIBLE_DEVICES``."""
    if "DGEX_GPUS" in os.environ:
        ids = [i.strip() for i in os.environ["DGEX_GPUS"].split(",") if i.strip()]
    elif shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(
                ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            ids = [line.strip() for line in res.stdout.splitlines() if line.strip()] if res.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            ids = []
    else:
        ids = []
    # after a lease CUDA_VISIBLE_DEVICES names only the leased GPU: filter by what it was before
    allowed = os.environ.get(_BEFORE_LEASE, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if allowed:
        keep = {i.strip() for i in allowed.split(",")}
        ids = [i for i in ids if i in keep]
    return ids


@dataclass
class GpuLease:
    """A held device: ``gpu`` id and where it came from (``lock`` or ``slurm``)."""

    gpu: str
    source: str
    path: Path | None = None
    _fd: int | None = None

    def release(self) -> None:
        """Give the device back (idempotent); the lock file stays for the next holder."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # a dropped lease object must not keep the device locked
        with contextlib.suppress(Exception):  # interpreter shutdown: the kernel frees the lock anyway
            self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _try_lock(path: Path, private: bool = True) -> int | None:
    fd, writable = _open_lock(path, private, create=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if writable:  # the holder line is informative only (`dgex gpus`); a read-only lock still excludes
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def lease_gpu(lock_dir=None, wait: bool = True, timeout: float | None = None, poll: float = 0.5) -> GpuLease | None:
    """Lease one free GPU for this process and point ``CUDA_VISIBLE_DEVICES`` at it.

    lock_dir: folder of the ``gpu<id>.lock`` files shared by all jobs (default: ``default_lock_dir()``).
    wait: poll every ``poll`` s while all GPUs are leased; with ``wait=False`` return None at once instead.
    timeout: seconds to wait before raising ConfigError (None: wait for ever).
    Returns the lease (keep it referenced: dropping it frees the GPU), a ``source="slurm"`` lease that holds
    nothing under SLURM, or None when no GPU is visible (run on the CPU).
    """
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info(
            "SLURM job: using the scheduler's GPU assignment CUDA_VISIBLE_DEVICES=%s",
            os.environ["CUDA_VISIBLE_DEVICES"],
        )
        return GpuLease(os.environ["CUDA_VISIBLE_DEVICES"], "slurm")
    gpus = visible_gpus()
    if not gpus:
        return None
    lock_dir, private = prepare_lock_dir(lock_dir)
    start, warned = time.monotonic(), False
    while True:
        for gpu in gpus:
            path = lock_dir / f"gpu{gpu}.lock"
            fd = _try_lock(path, private)
            if fd is not None:
                os.environ.setdefault(_BEFORE_LEASE, os.environ.get("CUDA_VISIBLE_DEVICES", ""))
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                log.info("leased GPU %s (%s)", gpu, path)
                return GpuLease(gpu, "lock", path, fd)
        if not wait:
            return None
        if timeout is not None and time.monotonic() - start > timeout:
            raise ConfigError(
                f"no free GPU among {', '.join(gpus)} after {timeout:g} s (leases in {lock_dir}); "
                f"lower --resources gpu=N to the number of GPUs or free the devices"
            )
        if not warned:
            log.warning("all GPUs (%s) are leased in %s; waiting for a free GPU", ", ".join(gpus), lock_dir)
            warned = True
        time.sleep(poll)


def lease_status(lock_dir=None) -> list[dict]:
    """Each visible GPU and who holds it: ``[{"gpu", "leased", "holder"}]``."""
    gpus = visible_gpus()
    if not gpus:
        return []
    lock_dir, private = prepare_lock_dir(lock_dir, create=False)
    rows = []
    for gpu in gpus:
        leased, holder = _probe(lock_dir / f"gpu{gpu}.lock", private)
        rows.append({"gpu": gpu, "leased": leased, "holder": holder})
    return rows


def _probe(path: Path, private: bool) -> tuple[bool, str]:
    """Whether a process holds the lease ``path``, and its holder line (a probe lock, dropped on close)."""
    try:
        fd, _ = _open_lock(path, private, create=False)
    except FileNotFoundError:
        return False, ""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False, ""
    except BlockingIOError:
        return True, os.pread(fd, 256, 0).decode(errors="replace").strip()
    finally:
        os.close(fd)


def pick_device(device: str = "auto"):
    """The torch device for ``auto`` (the GPU if there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
