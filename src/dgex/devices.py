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
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
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
    env = os.environ.get("DGEX_GPU_LOCK_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"dgex-gpu-locks-{os.getuid()}"


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
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel frees the lock anyway
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
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
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(lock_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as e:
        raise ConfigError(
            f"GPU lock folder {lock_dir} is not writable ({e.strerror}); "
            f"pass --gpu-lock-dir or set DGEX_GPU_LOCK_DIR to a writable folder"
        ) from None
    start, warned = time.monotonic(), False
    while True:
        for gpu in gpus:
            path = lock_dir / f"gpu{gpu}.lock"
            fd = _try_lock(path)
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
    lock_dir = Path(lock_dir) if lock_dir else default_lock_dir()
    rows = []
    for gpu in visible_gpus():
        path = lock_dir / f"gpu{gpu}.lock"
        leased = path.exists() and _is_locked(path)
        rows.append({"gpu": gpu, "leased": leased, "holder": path.read_text().strip() if leased else ""})
    return rows


def _is_locked(path: Path) -> bool:
    """Whether a process holds the lease ``path`` (a probe lock, dropped again when its descriptor closes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
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
