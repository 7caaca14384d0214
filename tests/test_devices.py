"""GPU leases: concurrent processes on fake device lists never share a GPU; leases die with their process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import assert_one_line_error
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
    from dgex.train import train
    from helpers_dataset import write_toy_dataset

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


# --------------------------------------------------------------------------- lock folders that cannot be trusted
OTHER_UID = 12345
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing file owners (os.chown) needs root")


@pytest.fixture
def private_dir(tmp_path, clean_env):
    """The default (private) lock folder inside this test's tmp dir; nothing configured."""
    clean_env.setattr(tempfile, "tempdir", str(tmp_path))
    clean_env.setenv("DGEX_GPUS", "0")
    return tmp_path / f"dgex-gpu-locks-{os.getuid()}"


@pytest.fixture
def open_tmp():
    """A folder every user can enter (pytest's tmp folders are private to root)."""
    d = Path(tempfile.mkdtemp(prefix="dgex-test-locks-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _as_user(uid: int, fn, while_alive=None):
    """Run ``fn()`` in a forked child as ``uid``: ("ok", value) / ("error", ConfigError text) / ("crash", repr).

    ``while_alive()`` runs in this process after the child reported and before it exits (its lease still held).
    """
    r, w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(r)
            os.close(hold_w)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                value = fn()
                out = ["ok", getattr(value, "gpu", value)]
            except ConfigError as e:
                out = ["error", str(e)]
            except BaseException as e:  # noqa: BLE001 - reported to the parent as a failure
                out = ["crash", repr(e)]
            os.write(w, (json.dumps(out, default=str) + "\n").encode())
            os.close(w)
            os.read(hold_r, 1)  # until the parent closes its end
        finally:
            os._exit(0)
    os.close(w)
    os.close(hold_r)
    with os.fdopen(r) as fh:
        out = json.loads(fh.readline())
    try:
        if while_alive is not None:
            while_alive()
    finally:
        os.close(hold_w)
        os.waitpid(pid, 0)
    return out


def _one_line(err, *fragments):
    msg = str(err.value)
    assert "\n" not in msg and "--gpu-lock-dir" in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_default_folder_is_created_private(private_dir):
    with lease_gpu() as lease:
        assert lease.path == private_dir / "gpu0.lock"
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    private_dir.chmod(0o777)  # ours but opened up (umask 0, older dgex): tightened, then used
    with lease_gpu() as lease:
        assert lease is not None
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700


@needs_root
def test_default_folder_owned_by_another_user_is_refused(private_dir):
    private_dir.mkdir(mode=0o777)
    os.chown(private_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as err:
        lease_gpu()
    _one_line(err, str(private_dir), f"uid {OTHER_UID}", "remove it")
    assert not (private_dir / "gpu0.lock").exists()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


@pytest.mark.parametrize("owner", ["me", "other"])
def test_default_folder_planted_as_a_symlink_is_refused(private_dir, tmp_path, owner):
    if owner == "other" and os.geteuid() != 0:
        pytest.skip("changing a link's owner (os.lchown) needs root")
    target = tmp_path / "elsewhere"
    target.mkdir()
    private_dir.symlink_to(target)
    if owner == "other":
        os.lchown(private_dir, OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as err:
        lease_gpu()
    _one_line(err, "symbolic link")
    assert list(target.iterdir()) == []


def test_default_folder_that_is_a_file(private_dir):
    private_dir.write_text("")
    with pytest.raises(ConfigError) as err:
        lease_gpu()
    _one_line(err, "is not a folder")


@needs_root
def test_another_users_lock_file_in_the_private_folder(private_dir):
    private_dir.mkdir(mode=0o700)
    (private_dir / "gpu0.lock").write_text("")
    os.chown(private_dir / "gpu0.lock", OTHER_UID, OTHER_UID)
    with pytest.raises(ConfigError) as err:
        lease_gpu()
    _one_line(err, "gpu0.lock", f"uid {OTHER_UID}")


@pytest.mark.parametrize("configured", ["argument", "environment", "default"])
def test_planted_lock_file_symlink_never_clobbers_its_target(tmp_path, private_dir, configured):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = private_dir if configured == "default" else tmp_path / "shared"
    folder.mkdir(mode=0o700)
    (folder / "gpu0.lock").symlink_to(victim)
    if configured == "environment":
        os.environ["DGEX_GPU_LOCK_DIR"] = str(folder)  # restored by clean_env
    with pytest.raises(ConfigError) as err:
        lease_gpu(folder if configured == "argument" else None)
    _one_line(err, str(folder / "gpu0.lock"), "symbolic link")
    assert victim.read_text() == "precious\n"
    with pytest.raises(ConfigError, match="symbolic link"):
        lease_status(folder if configured == "argument" else None)
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_lock_file_that_is_not_a_regular_file(tmp_path, clean_env, kind):
    clean_env.setenv("DGEX_GPUS", "0")
    lock = tmp_path / "gpu0.lock"
    lock.mkdir() if kind == "folder" else os.mkfifo(lock)
    with pytest.raises(ConfigError) as err:  # a FIFO must not block the open either
        lease_gpu(tmp_path, wait=False)
    _one_line(err, str(lock))


@needs_root
def test_explicit_shared_folder_of_another_owner_is_used(tmp_path, clean_env, caplog):
    clean_env.setenv("DGEX_GPUS", "0")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # what an admin makes for a group of users: sticky, so nobody deletes others' locks
    os.chown(shared, OTHER_UID, OTHER_UID)
    with caplog.at_level(logging.WARNING, logger="dgex.devices"), lease_gpu(shared) as lease:
        assert lease.path == shared / "gpu0.lock"
    assert not caplog.records
    shared.chmod(0o777)  # no sticky bit: others could delete a held lock file -> said once, still used
    with caplog.at_level(logging.WARNING, logger="dgex.devices"), lease_gpu(shared) as lease:
        assert lease is not None
    assert [r.getMessage() for r in caplog.records if "sticky" in r.getMessage()]


def test_explicit_folder_symlinks(tmp_path, clean_env):
    clean_env.setenv("DGEX_GPUS", "0")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "mine").symlink_to(real)  # the user's own link: followed
    with lease_gpu(tmp_path / "mine") as lease:
        assert lease is not None and (real / "gpu0.lock").exists()
    if os.geteuid() == 0:
        (tmp_path / "theirs").symlink_to(real)
        os.lchown(tmp_path / "theirs", OTHER_UID, OTHER_UID)
        with pytest.raises(ConfigError) as err:
            lease_gpu(tmp_path / "theirs")
        _one_line(err, "symbolic link", f"uid {OTHER_UID}")


def test_status_creates_nothing(tmp_path, private_dir):
    assert lease_status() == [{"gpu": "0", "leased": False, "holder": ""}]
    assert lease_status(tmp_path / "none") == [{"gpu": "0", "leased": False, "holder": ""}]
    assert not private_dir.exists() and not (tmp_path / "none").exists()


@needs_root
def test_cli_names_the_planted_folder(tmp_path):
    planted = tmp_path / "planted"
    planted.mkdir()
    os.chown(planted, OTHER_UID, OTHER_UID)
    env = _env(DGEX_GPUS="0", TMPDIR=str(tmp_path))
    planted.rename(tmp_path / f"dgex-gpu-locks-{os.getuid()}")
    res = subprocess.run([sys.executable, "-m", "dgex", "gpus"], capture_output=True, text=True, env=env)
    assert_one_line_error(res, f"dgex-gpu-locks-{os.getuid()}", f"uid {OTHER_UID}")


# --------------------------------------------------------------------------- two real users sharing a folder
@needs_root
def test_users_exclude_each_other_through_a_shared_folder(open_tmp, clean_env):
    """Another user's read-only lock file is locked read-only: the GPU is still never shared."""
    clean_env.setenv("DGEX_GPUS", "0")
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    other = 65534  # nobody
    held = lease_gpu(shared)  # root's lock file, mode 0644: read-only for nobody
    assert stat.S_IMODE((shared / "gpu0.lock").stat().st_mode) & 0o022 == 0
    assert _as_user(other, lambda: lease_gpu(shared, wait=False)) == ["ok", None]
    held.release()
    # and the other way round: while nobody holds GPU 0 (through its read-only descriptor), root cannot get it
    seen = {}
    out = _as_user(
        other, lambda: lease_gpu(shared, wait=False), lambda: seen.update(root=lease_gpu(shared, wait=False))
    )
    assert out == ["ok", "0"] and seen["root"] is None
    with lease_gpu(shared, wait=False) as lease:  # free again once nobody's process is gone
        assert lease is not None


@needs_root
def test_other_user_gets_one_line_errors(open_tmp, clean_env):
    clean_env.setenv("DGEX_GPUS", "0")
    shut = open_tmp / "root-only"
    shut.mkdir(mode=0o755)  # exists, owned by root, not writable for nobody
    res = _as_user(65534, lambda: lease_gpu(shut, wait=False))
    assert res[0] == "error" and "is not writable" in res[1] and "--gpu-lock-dir" in res[1], res
    shared = open_tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / "gpu0.lock").write_text("")
    (shared / "gpu0.lock").chmod(0o600)  # cannot even be read by nobody: cannot tell whether it is held
    res = _as_user(65534, lambda: lease_gpu(shared, wait=False))
    assert res[0] == "error" and "gpu0.lock cannot be opened (Permission denied)" in res[1], res
    # nobody's default folder, planted by root
    clean_env.setattr(tempfile, "tempdir", str(open_tmp))
    (open_tmp / "dgex-gpu-locks-65534").mkdir(mode=0o777)
    res = _as_user(65534, lambda: lease_gpu(wait=False))
    assert res[0] == "error" and "belongs to uid 0" in res[1], res
