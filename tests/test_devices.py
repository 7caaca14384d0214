"""GPU leases: concurrent processes on fake device lists never share a GPU; leases die with their process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from dgex.devices import _BEFORE_LEASE, lease_gpu, lease_status, visible_gpus
from dgex.errors import ConfigError

# Leases a GPU from a fake list, then holds it for argv[2] seconds and reports (gpu, start, end).
HOLDER = """
import json, os, sys, time
from dgex.devices import lease_gpu
lease = lease_gpu(sys.argv[1], poll=0.02)
start = time.time()
print(json.dumps({"gpu": lease.gpu, "env": os.environ["CUDA_VISIBLE_DEVICES"], "pid": os.getpid()}), flush=True)
time.sleep(float(sys.argv[2]))
print(json.dumps({"gpu": lease.gpu, "start": start, "end": time.time()}), flush=True)
"""


def _env(**extra):
    """Subprocess environment without SLURM / CUDA_VISIBLE_DEVICES from the caller's shell."""
    drop = ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "DGEX_GPU_LOCK_DIR", _BEFORE_LEASE)
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, **extra}


def _holder(lock_dir, gpus, seconds):
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), str(seconds)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(DGEX_GPUS=gpus),
    )


@pytest.fixture
def clean_env(monkeypatch):
    """No SLURM, no CUDA_VISIBLE_DEVICES; restored afterwards even though lease_gpu sets it."""
    for name in ("SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES", "DGEX_GPU_LOCK_DIR", _BEFORE_LEASE):
        monkeypatch.setenv(name, "x")  # records the original value so teardown restores it
        monkeypatch.delenv(name)
    monkeypatch.setenv("DGEX_GPUS", "0,1")
    return monkeypatch


def test_concurrent_jobs_never_share_a_gpu(tmp_path):
    procs = [_holder(tmp_path, "0,1", 1.0) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    first = [json.loads(o[0].splitlines()[0]) for o in outs]
    assert all(r["env"] == r["gpu"] for r in first)  # CUDA_VISIBLE_DEVICES points at the leased id
    spans = [json.loads(o[0].splitlines()[1]) for o in outs]
    for gpu in ("0", "1"):
        held = sorted((r["start"], r["end"]) for r in spans if r["gpu"] == gpu)
        assert held, f"GPU {gpu} never used"
        for (_, end1), (start2, _) in zip(held, held[1:]):
            assert start2 >= end1, f"GPU {gpu} held by two processes at once"
    # 4 jobs on 2 GPUs: two waited for a free GPU rather than failing or doubling up
    assert sorted(r["gpu"] for r in spans) == ["0", "0", "1", "1"]


def test_lease_is_freed_when_the_holder_is_killed(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPUS", "0")
    holder = _holder(tmp_path, "0", 60)
    try:
        info = json.loads(holder.stdout.readline())  # printed once the lease is held
        assert info["gpu"] == "0"
        assert lease_gpu(tmp_path, wait=False) is None  # held by the other process
        assert lease_status(tmp_path) == [{"gpu": "0", "leased": True, "holder": f"{info['pid']} {os.uname()[1]}"}]
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate()
    with lease_gpu(tmp_path, wait=False) as lease:
        assert lease is not None and lease.gpu == "0"


def test_release_and_dropping_the_lease_free_the_gpu(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPUS", "0")
    lease = lease_gpu(tmp_path)
    assert lease.source == "lock" and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert lease_gpu(tmp_path, wait=False) is None
    lease.release()
    lease.release()  # idempotent
    lease = lease_gpu(tmp_path, wait=False)
    assert lease is not None
    del lease  # garbage-collected lease object -> lock released
    assert lease_gpu(tmp_path, wait=False) is not None


def test_slurm_assignment_is_kept(tmp_path, clean_env):
    clean_env.setenv("SLURM_JOB_ID", "123")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3")
    clean_env.setenv("DGEX_GPUS", "0,1,2,3")
    lease = lease_gpu(tmp_path / "locks")
    assert lease.source == "slurm" and lease.gpu == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert not (tmp_path / "locks").exists()  # nothing leased, no lock file
    lease.release()  # a no-op


def test_slurm_without_gpu_assignment_still_leases(tmp_path, clean_env):
    clean_env.setenv("SLURM_JOB_ID", "123")  # no CUDA_VISIBLE_DEVICES: not a GPU allocation from SLURM
    with lease_gpu(tmp_path) as lease:
        assert lease.source == "lock" and (tmp_path / "gpu0.lock").exists()


def test_no_gpu_means_cpu(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPUS", "")
    assert visible_gpus() == []
    assert lease_gpu(tmp_path / "locks") is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    assert not (tmp_path / "locks").exists()


def test_nvidia_smi_failure_means_no_gpu(tmp_path, clean_env):
    clean_env.delenv("DGEX_GPUS")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (fake / "nvidia-smi").chmod(0o755)
    clean_env.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    assert visible_gpus() == []
    (fake / "nvidia-smi").write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    assert visible_gpus() == ["0", "1", "2"]


def test_cuda_visible_devices_restricts_the_candidates(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPUS", "0,1,2,3")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert visible_gpus() == ["1", "3"]
    with lease_gpu(tmp_path) as a, lease_gpu(tmp_path) as b:
        assert (a.gpu, b.gpu) == ("1", "3")
        assert not (tmp_path / "gpu0.lock").exists()


def test_waiting_times_out_with_one_line_naming_the_lock_dir(tmp_path, clean_env, caplog):
    a, b = lease_gpu(tmp_path), lease_gpu(tmp_path)
    assert {a.gpu, b.gpu} == {"0", "1"}
    with caplog.at_level(logging.INFO, logger="dgex.devices"), pytest.raises(ConfigError) as err:
        lease_gpu(tmp_path, timeout=0.3, poll=0.02)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    assert sum("waiting for a free GPU" in r.getMessage() for r in caplog.records) == 1  # logged once, not per poll
    a.release()
    b.release()


def test_unwritable_lock_dir_is_a_one_line_error(tmp_path, clean_env):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="--gpu-lock-dir") as err:
        lease_gpu(blocker / "locks")
    assert str(blocker / "locks") in str(err.value) and "\n" not in str(err.value)


def test_default_lock_dir(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPU_LOCK_DIR", str(tmp_path / "env-locks"))
    with lease_gpu() as lease:
        assert lease.path == tmp_path / "env-locks" / "gpu0.lock"


def test_gpus_command_lists_leases(tmp_path):
    cmd = [sys.executable, "-m", "dgex", "gpus", "--lock-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_env(DGEX_GPUS=""))
    assert res.returncode == 0 and "no GPU visible" in res.stdout
    holder = _holder(tmp_path, "1", 60)
    try:
        pid = json.loads(holder.stdout.readline())["pid"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(DGEX_GPUS="0,1"))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate()
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["GPU 0: free", f"GPU 1: leased by {pid} {os.uname()[1]}"]


def test_train_leases_a_gpu_and_gives_it_back(tmp_path, clean_env):
    from helpers_dataset import write_toy_dataset

    from dgex.train import train

    toy = write_toy_dataset(tmp_path / "toy.h5", n_tr=60, n_landmarks=4, n_targets=4, n_parts=1)
    clean_env.setenv("DGEX_GPUS", "0")
    kw = dict(
        dataset=toy["path"],
        layers=1,
        units=4,
        dropout=0.0,
        part=None,
        epochs=1,
        batch_size=30,
        monitor_size=20,
        progress=False,
        gpu_lock_dir=tmp_path / "locks",
    )
    # device "auto": the fake GPU is leased (torch still finds no CUDA here and trains on the CPU)
    summary = train(output_dir=tmp_path / "auto", device="auto", **kw)
    assert summary["gpu_lease"] == {"gpu": "0", "source": "lock"}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert lease_status(tmp_path / "locks")[0]["leased"] is False  # released when train returned
    summary = train(output_dir=tmp_path / "cpu", device="cpu", **{**kw, "gpu_lock_dir": tmp_path / "cpu-locks"})
    assert summary["gpu_lease"] is None and not (tmp_path / "cpu-locks").exists()
