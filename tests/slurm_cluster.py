"""A private single-node SLURM cluster with emulated GPUs, all inside one folder.

Used by tests/test_slurm.py, and by hand to try the SLURM profile on one machine (as root, with Debian's
``slurm-wlm`` and ``munge``)::

    python tests/slurm_cluster.py /tmp/cluster      # starts it, prints how to use it, stops it on Ctrl-C

Everything lives under the folder: munged with its own key, socket, pid, log and seed files; slurmctld and
slurmd on free TCP ports, with their state, spool, pid and log files; ``slurm.conf`` and ``gres.conf``; two
character devices (``mknod gpu0 c 1 3``) that stand for the GPUs (``gres.conf`` needs ``File=`` or the node is
invalid; SLURM then sets ``CUDA_VISIBLE_DEVICES`` for a job that asks for a GPU); and ``bin/``, wrappers of
the SLURM commands that point them at this cluster's ``slurm.conf``. Put ``bin/`` first on ``PATH`` and
``sbatch``, ``srun``, ``squeue`` ... talk to this cluster. (Exporting ``SLURM_CONF`` is not enough:
the Snakemake job-step plugin removes every ``SLURM_*`` variable before it calls ``srun`` inside a job.)

The node claims more CPUs than GPUs (``SlurmdParameters=config_overrides``), so that the two GPUs, not the
CPUs, are what limits how many training jobs run at once. Job records come from ``jobcomp/filetxt``
(start/end time, state, allocated TRES of every finished job) and from slurmctld's log (timestamps in
milliseconds): there is no accounting database, hence no ``sacct``.

The daemons run in the foreground as children of this process, which keeps their pids; they get SIGTERM if
this process dies (``PR_SET_PDEATHSIG``). ``stop()`` cancels every job, waits for them, then stops slurmd,
slurmctld and munged by those pids (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")  # needed; every other s* client is wrapped too
SLURM_CLIENTS = CLIENTS + (
    "sacct",
    "sacctmgr",
    "salloc",
    "sattach",
    "sbcast",
    "sdiag",
    "sprio",
    "sreport",
    "sshare",
    "sstat",
    "strigger",
)
PR_SET_PDEATHSIG = 1


class SlurmUnavailable(RuntimeError):
    """The cluster cannot be started here (not root, packages missing, no mknod, a daemon failed)."""


def _die_with_parent():  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_records(text: str) -> list[dict]:
    """``Key=Value Key=Value ...`` lines (jobcomp/filetxt, ``scontrol -o``) as dicts."""
    records = []
    for line in text.splitlines():
        rec, key = {}, None
        for token in line.split():  # runs of spaces (and the line's trailing one) are one separator
            if "=" in token and token.split("=", 1)[0].isidentifier():
                key, value = token.split("=", 1)
                rec[key] = value
            elif key is not None:  # a value with spaces (e.g. a job name)
                rec[key] += " " + token
        if rec:
            records.append(rec)
    return records


class PrivateSlurm:
    """One node (``cpus`` CPUs, ``gpus`` emulated GPUs) and one partition, under ``root``."""

    def __init__(
        self, root, cpus: int = 4, gpus: int = 2, gpu_type: str = "emu", memory_mb: int = 64000, partition: str = "dgex"
    ):
        self.root = Path(root).resolve()
        self.cpus, self.gpus, self.gpu_type, self.memory_mb, self.partition = cpus, gpus, gpu_type, memory_mb, partition
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin = self.root / "bin"
        self.log = self.root / "log"
        self.jobcomp = self.log / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ set-up
    def check(self) -> None:
        """Raise SlurmUnavailable with the reason when this machine cannot run the cluster."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("a private SLURM needs root (slurmd runs jobs as their user)")
        missing = [c for c in DAEMONS + CLIENTS if not shutil.which(c, path=f"{os.environ.get('PATH', '')}:/usr/sbin")]
        if missing:
            raise SlurmUnavailable(
                f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge)"
            )

    @property
    def env(self) -> dict:
        """The environment of a process that uses this cluster: its commands first on PATH, its SLURM_CONF."""
        env = dict(os.environ)
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env["SLURM_CONF"] = str(self.conf)
        return env

    def _write_files(self) -> None:
        for sub in ("etc", "bin", "log", "run", "state", "spool", "gpu", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for i in range(self.gpus):
            dev = self.root / "gpu" / f"gpu{i}"
            if not dev.exists():
                try:
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
                except OSError as e:
                    raise SlurmUnavailable(f"cannot create the emulated GPU device {dev} with mknod: {e}") from None
        r = self.root
        lines = [
            "ClusterName=dgextest",
            f"SlurmctldHost={self.node}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.pid",
            f"SlurmctldLogFile={self.log}/slurmctld.log",
            f"SlurmdLogFile={self.log}/slurmd.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "LogTimeFormat=iso8601_ms",
            f"PlugStackConfig={r}/etc/plugstack.conf",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SchedulerType=sched/backfill",
            # schedule at once: the main loop and backfill every second (defaults: 60 s and 30 s)
            "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SlurmdParameters=config_overrides",  # the node may claim more CPUs/memory than the machine has
            "ReturnToService=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.jobcomp}",
            "MinJobAge=600",  # finished jobs stay visible to squeue (the status command without accounting)
            "KillWait=5",
            "GresTypes=gpu",
            f"NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb} Gres=gpu:{self.gpu_type}:{self.gpus} "
            "State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "etc" / "plugstack.conf").write_text("")
        files = f"gpu[0-{self.gpus - 1}]" if self.gpus > 1 else "gpu0"
        (r / "etc" / "gres.conf").write_text(
            f"NodeName={self.node} Name=gpu Type={self.gpu_type} File={r}/gpu/{files}\n"
        )
        for cmd in SLURM_CLIENTS:
            real = shutil.which(cmd, path="/usr/bin:/bin:/usr/sbin")
            if real:
                w = self.bin / cmd
                w.write_text(f'#!/bin/sh\nSLURM_CONF={self.conf} exec {real} "$@"\n')
                w.chmod(0o755)

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.log / f"{name}.out", "ab")  # noqa: SIM115 -- handed to the daemon, closed after Popen
        try:
            self.procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent,
            )
        finally:
            out.close()

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise SlurmUnavailable(f"{name} exited with status {p.returncode} while {what}: {self.tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmUnavailable(f"timed out after {timeout:g} s {what}: {self.tail()}")

    def _run(self, *argv, timeout: float = 15, check: bool = False) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def _ok(self, *argv) -> subprocess.CompletedProcess | None:
        try:
            res = self._run(*argv, timeout=10)
        except subprocess.TimeoutExpired:
            return None
        return res if res.returncode == 0 else None

    def start(self, timeout: float = 60) -> PrivateSlurm:
        """Start munged, slurmctld and slurmd; return once the node is idle. SlurmUnavailable otherwise."""
        self.check()
        self._write_files()
        m = self.root / "munge"
        self._spawn(
            "munged",
            [
                shutil.which("munged", path="/usr/sbin:/usr/bin"),
                "--foreground",
                "--force",
                f"--socket={m}/munge.socket",
                f"--key-file={m}/munge.key",
                f"--pid-file={m}/munged.pid",
                f"--log-file={self.log}/munged.log",
                f"--seed-file={m}/munged.seed",
                "--num-threads=4",
            ],
        )
        self._wait("starting munged", lambda: (m / "munge.socket").exists(), timeout)
        self._spawn("slurmctld", [shutil.which("slurmctld", path="/usr/sbin:/usr/bin"), "-D", "-f", str(self.conf)])
        self._wait("waiting for slurmctld", lambda: self._ok("scontrol", "ping") is not None, timeout)
        self._spawn("slurmd", [shutil.which("slurmd", path="/usr/sbin:/usr/bin"), "-D", "-f", str(self.conf)])

        def idle():
            res = self._ok("sinfo", "-h", "-N", "-o", "%T")
            state = res.stdout.strip() if res else ""
            if state.startswith(("inval", "drain", "fail")):
                raise SlurmUnavailable(f"node {self.node} is {state}: {self.tail('slurmctld')}")
            return state == "idle"

        self._wait("waiting for the node to become idle", idle, timeout)
        return self

    # ---------------------------------------------------------------- tear-down
    def job_ids(self) -> list[str]:
        res = self._ok("squeue", "-h", "-o", "%i")
        return res.stdout.split() if res else []

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, wait for them, stop the daemons this object started (by pid). Idempotent."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                active = list(self.job_ids())
                if active:
                    self._run("scancel", *active, timeout=10)
                    deadline = time.monotonic() + timeout
                    while time.monotonic() < deadline:
                        res = self._ok("squeue", "-h", "-t", "PD,R,CG,S", "-o", "%i")
                        if res is not None and not res.stdout.strip():
                            break
                        time.sleep(0.5)
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # ---------------------------------------------------------------- reading
    def tail(self, name: str = "slurmctld", lines: int = 15) -> str:
        for path in (self.log / f"{name}.log", self.log / f"{name}.out"):
            if path.exists() and path.stat().st_size:
                return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
        return f"(no log of {name})"

    def finished_jobs(self) -> list[dict]:
        """jobcomp/filetxt records of every finished job: JobId, Name, JobState, StartTime, EndTime, Tres, ..."""
        return parse_records(self.jobcomp.read_text()) if self.jobcomp.exists() else []


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="where the cluster lives (created; reused files are overwritten)")
    p.add_argument("--cpus", type=int, default=4)
    p.add_argument("--gpus", type=int, default=2)
    args = p.parse_args(argv)
    cluster = PrivateSlurm(args.folder, cpus=args.cpus, gpus=args.gpus)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        print(f"slurm_cluster: {e}", file=sys.stderr)
        return 2
    print(f"cluster up: partition {cluster.partition}, node {cluster.node}, {args.cpus} CPUs, {args.gpus} GPUs")
    print(f"in another shell:  export PATH={cluster.bin}:$PATH   (then sbatch, squeue, snakemake ...)")
    print("Ctrl-C stops it")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
