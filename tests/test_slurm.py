"""The SLURM profile on a real, private, single-node SLURM with two emulated GPUs (tests/slurm_cluster.py).

The test config runs twice: on this machine (``--cores 2 --resources gpu=2``) and through
``profiles/slurm`` on the private cluster, with the README's command ("Running on a SLURM cluster").
While the SLURM run goes, a watcher samples ``squeue`` every 0.1 s and cancels (``scancel``) one training
job once it has written a checkpoint. Afterwards the tests check, from SLURM's own job records
(``scontrol show job``, kept for ``MinJobAge``) and the run folders:

* every job of the workflow was a batch job (``sbatch``), one per Snakemake job, plus the retry;
* every training job asked for one GPU, SLURM assigned it one, and that GPU (``CUDA_VISIBLE_DEVICES``) is
  what ``dgex train`` used: run.json ``gpu_lease`` = {the GPU index SLURM allocated, source ``slurm``};
* never more than two training jobs held the node at once (the two GPUs; the node has four CPUs), and two did;
* the cancelled job was resubmitted, continued from its checkpoint, and gave the local run's result;
* the final tables are those of the local run, byte for byte.

Needs root and Debian's slurm-wlm + munge (``.ci/run`` installs them); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from dgex.train import read_checkpoint_state
from helpers_workflow import job_counts
from slurm_cluster import PrivateSlurm, SlurmUnavailable, parse_records

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

PARTITION, GPU_MODEL = "dgex", "emu"  # this cluster's names (the README's are examples: cpu, gpu, a100)
# config/test.yaml, made to use GPUs, to checkpoint every epoch and to train long enough to be cancelled; cut
# to what scheduling needs (4 trainings, 2 baselines, the tables), since it runs twice on a shared CPU
OVERLAY = {
    "train": {"gpu": True, "device": "auto", "checkpoint_interval": 0, "epochs": 40},
    "grid": {"units": [8], "dropout": [0.0]},
    "baselines": {"methods": ["lr", "ridge"]},
    "report": {"figures": False},
    "export": {"enabled": False},
    "interpret": {"s2": False, "s3": False},
}
N_TRAIN = 4  # 2 depths x 1 width x 1 dropout x 2 target parts: more than the 2 GPUs
SMK_TIMEOUT = 600


def slurm_argv(configfiles):
    """The README's SLURM command with this cluster's names (test_readme_commands_are_the_tests checks it)."""
    return [
        "snakemake",
        "--workflow-profile",
        "profiles/slurm",
        "--configfile",
        *configfiles,
        "--default-resources",
        f"slurm_partition={PARTITION}",
        "mem_mb=4000",
        "runtime=60",
        "--set-resources",
        f"train:slurm_partition={PARTITION}",
        f"train:gpu_model={GPU_MODEL}",
    ]


def local_argv(configfiles):
    """The README's single-machine command with GPU leases."""
    return ["snakemake", "--cores", "2", "--resources", "gpu=2", "--configfile", *configfiles]


def _overlay(tmp_path: Path, name: str) -> Path:
    cfg = {"results_dir": str(tmp_path / name / "results"), "resources_dir": str(tmp_path / name / "resources")}
    cfg.update(OVERLAY)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_dirs(results: Path) -> list[Path]:
    return sorted((results / "test" / "runs" / "dgex").glob("*x*_d*/part*"))


def _wildcards(run_dir: Path) -> str:
    """``2x16_d0.25/part1`` -> ``2_16_0.25_1``, how the SLURM plugin names a train job in its comment."""
    layers, rest = run_dir.parent.name.split("x")
    units, dropout = rest.split("_d")
    return f"{layers}_{units}_{dropout}_{run_dir.name.removeprefix('part')}"


class Watcher(threading.Thread):
    """Samples the cluster's training jobs; cancels one of them once it has a checkpoint."""

    def __init__(self, cluster: PrivateSlurm, results: Path, snapshot: Path):
        super().__init__(daemon=True)
        self.cluster, self.results, self.snapshot = cluster, results, snapshot
        self.stop = threading.Event()
        self.max_training, self.samples = 0, 0
        self.victim: dict | None = None  # job id, run folder
        self.snapshot_taken = False  # the victim's last.ckpt, copied once the cancelled job has ended
        self.gpu_index: dict[str, str] = {}  # training job id -> the GPU SLURM allocated (gone once it ends)
        self.errors: list[str] = []

    def _squeue(self) -> list[tuple[str, str, str]]:
        res = subprocess.run(
            ["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], env=self.cluster.env, capture_output=True, text=True
        )
        if res.returncode:
            self.errors.append(res.stderr.strip())
            return []
        return [tuple(line.split("|", 2)) for line in res.stdout.splitlines()]

    def run(self):
        while not self.stop.is_set():
            jobs = self._squeue()
            # COMPLETING still holds the job's GPU: it counts as running
            training = [j for j in jobs if j[2].startswith("rule_train_") and j[1] in ("RUNNING", "COMPLETING")]
            self.max_training = max(self.max_training, len(training))
            self.samples += 1
            for job in training:
                if job[1] == "RUNNING" and job[0] not in self.gpu_index:
                    self._record_gpu(job[0])
            if self.victim is None:
                self._maybe_cancel({j[2]: j[0] for j in training if j[1] == "RUNNING"})
            elif not self.snapshot_taken and {j[0]: j[1] for j in jobs}.get(self.victim["job"]) == "CANCELLED":
                # ended (not COMPLETING): nothing writes last.ckpt until the retry starts, seconds later
                shutil.copy(self.victim["run_dir"] / "last.ckpt", self.snapshot)
                self.snapshot_taken = True
            time.sleep(0.1)

    def _record_gpu(self, job: str) -> None:
        res = subprocess.run(
            ["scontrol", "-d", "-o", "show", "job", job], env=self.cluster.env, capture_output=True, text=True
        )
        idx = re.search(r" GRES=gpu:\w+:1\(IDX:(\d+)\)", res.stdout)
        if idx:
            self.gpu_index[job] = idx.group(1)

    def _maybe_cancel(self, running: dict[str, str]) -> None:
        for run_dir in _run_dirs(self.results):
            job = running.get(f"rule_train_wildcards_{_wildcards(run_dir)}")
            if job and (run_dir / "last.ckpt").exists() and not (run_dir / "run.json").exists():
                subprocess.run(["scancel", job], env=self.cluster.env, check=True, capture_output=True)
                self.victim = {"job": job, "run_dir": run_dir, "time": time.time()}
                return


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = PrivateSlurm(tmp_path_factory.mktemp("cluster"), cpus=4, gpus=2, gpu_type=GPU_MODEL, partition=PARTITION)
    try:
        c.start()
    except SlurmUnavailable as e:
        c.stop()
        pytest.skip(f"no private SLURM here: {e}")
    try:
        yield c
    finally:
        c.stop()
        alive = [name for name, p in c.procs.items() if p.poll() is None]
        assert not alive, f"daemons still running after stop(): {alive}"


def _snakemake(argv, env=None):
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=SMK_TIMEOUT
    )


@pytest.fixture(scope="module")
def grid(cluster, tmp_path_factory):
    """Both runs of the test config, the cluster's job records and what the watcher saw."""
    tmp = tmp_path_factory.mktemp("grid")
    t0 = time.monotonic()
    local = _snakemake(local_argv(["config/test.yaml", _overlay(tmp, "local")]))
    assert local.returncode == 0, local.stderr[-3000:]
    t_local = time.monotonic() - t0

    results = tmp / "slurm" / "results"
    env = cluster.env
    env["PATH"] = f"{cluster.bin}:{Path(sys.executable).parent}:{env['PATH']}"
    watcher = Watcher(cluster, results, tmp / "cancelled.ckpt")
    watcher.start()
    t0 = time.monotonic()
    try:
        smk = _snakemake(slurm_argv(["config/test.yaml", _overlay(tmp, "slurm")]), env=env)
    finally:
        watcher.stop.set()
        watcher.join(10)
    t_slurm = time.monotonic() - t0
    assert smk.returncode == 0, (smk.stdout + smk.stderr)[-5000:]
    show = subprocess.run(
        ["scontrol", "-d", "-o", "show", "job"], env=cluster.env, capture_output=True, text=True, check=True
    )
    jobs = parse_records(show.stdout)
    print(
        f"\nSLURM test: local run {t_local:.0f} s, SLURM run {t_slurm:.0f} s, {len(jobs)} SLURM jobs, "
        f"{watcher.samples} squeue samples, at most {watcher.max_training} training jobs at once"
    )
    return {
        "local": tmp / "local" / "results" / "test",
        "slurm": results / "test",
        "stats": job_counts(smk.stdout + smk.stderr),
        "output": smk.stdout + smk.stderr,
        "jobs": jobs,
        "watcher": watcher,
        "snapshot": tmp / "cancelled.ckpt",
    }


def _rule(job: dict) -> str:
    """Rule name from the plugin's comment ``rule_<name>`` or ``rule_<name>_wildcards_<values>``."""
    return job["Comment"].removeprefix("rule_").split("_wildcards_")[0]


def _train_jobs(grid) -> list[dict]:
    return [j for j in grid["jobs"] if _rule(j) == "train"]


def test_every_job_went_through_sbatch(grid):
    jobs, stats = grid["jobs"], grid["stats"]
    assert not grid["watcher"].errors, grid["watcher"].errors
    assert all(j["BatchFlag"] == "1" for j in jobs), [j["JobId"] for j in jobs if j["BatchFlag"] != "1"]
    submitted: dict[str, int] = {}
    for j in jobs:
        submitted[_rule(j)] = submitted.get(_rule(j), 0) + 1
    expected = {rule: n for rule, n in stats.items() if rule not in ("all", "total")}  # `all` is a local rule
    expected["train"] += 1  # the cancelled job was submitted again
    assert submitted == expected
    assert stats["train"] == N_TRAIN and sum(expected.values()) == len(jobs)


def test_training_jobs_got_one_gpu_each_and_dgex_used_it(grid):
    train_jobs = _train_jobs(grid)
    assert train_jobs
    for j in grid["jobs"]:
        gres = j.get("TresPerJob", "") + j.get("TresPerNode", "")
        if _rule(j) == "train":
            assert gres == f"gres:gpu:{GPU_MODEL}:1", j  # --gpus=emu:1 (gpu_model), not more
        else:
            assert "gpu" not in gres, j
    # the GPU SLURM allocated to each finished training job is the one dgex train used
    by_run = {j["Comment"]: j for j in train_jobs if j["JobState"] == "COMPLETED"}
    used = set()
    for run_dir in _run_dirs(grid["slurm"].parent):
        job = by_run[f"rule_train_wildcards_{_wildcards(run_dir)}"]["JobId"]
        gpu = grid["watcher"].gpu_index[job]
        record = json.loads((run_dir / "run.json").read_text())
        assert record["gpu_lease"] == {"gpu": gpu, "source": "slurm"}, (run_dir, record["gpu_lease"])
        used.add(gpu)
    assert len(by_run) == N_TRAIN and used == {"0", "1"}


def test_at_most_two_training_jobs_at_once(grid):
    w = grid["watcher"]
    assert w.samples > 100
    assert w.max_training == 2  # the two GPUs limit it (four CPUs would allow four), and both were used
    # the same from SLURM's records: no instant with three training jobs (second resolution, ends exclusive)
    spans = [(j["StartTime"], j["EndTime"]) for j in _train_jobs(grid)]
    for start, _ in spans:
        overlapping = sum(s <= start < e for s, e in spans)
        assert overlapping <= 2, (start, sorted(spans))


def test_cancelled_training_is_retried_and_resumes_to_the_same_result(grid):
    victim = grid["watcher"].victim
    assert victim, "no training job was cancelled"
    run_dir = victim["run_dir"]
    comment = f"rule_train_wildcards_{_wildcards(run_dir)}"
    attempts = sorted((j for j in grid["jobs"] if j["Comment"] == comment), key=lambda j: int(j["JobId"]))
    assert [j["JobState"] for j in attempts] == ["CANCELLED", "COMPLETED"], attempts
    assert attempts[0]["JobId"] == victim["job"]
    # the retry continued from the checkpoint the cancelled job left instead of starting again: the epochs
    # before it are that job's (their measured durations are in the checkpoint), the rest were trained again
    assert grid["watcher"].snapshot_taken
    done = read_checkpoint_state(grid["snapshot"])["history"]
    history = pd.read_csv(run_dir / "history.csv")
    assert 1 <= len(done) < OVERLAY["train"]["epochs"] == len(history)
    assert np.allclose(history["seconds"][: len(done)], [e["seconds"] for e in done], rtol=1e-9, atol=0)
    log = (grid["slurm"] / "logs" / "train" / f"{run_dir.parent.name}_{run_dir.name}.log").read_text()
    assert "starting from scratch" not in log and "cannot resume" not in log, log
    local = grid["local"] / "runs" / "dgex" / run_dir.parent.name / run_dir.name
    assert (run_dir / "per_gene.csv").read_bytes() == (local / "per_gene.csv").read_bytes()


def test_tables_equal_the_local_run(grid):
    names = sorted(p.name for p in (grid["local"] / "tables").iterdir() if p.suffix in (".csv", ".md"))
    assert any(n.endswith(".csv") for n in names)
    for name in names:
        assert (grid["slurm"] / "tables" / name).read_bytes() == (grid["local"] / "tables" / name).read_bytes(), name
    # and every training's per-gene result
    local_runs = _run_dirs(grid["local"].parent)
    assert len(local_runs) == N_TRAIN
    for run_dir in local_runs:
        other = grid["slurm"] / run_dir.relative_to(grid["local"])
        assert (other / "per_gene.csv").read_bytes() == (run_dir / "per_gene.csv").read_bytes(), run_dir


def _readme_commands(section: str) -> list[list[str]]:
    """The snakemake commands of a README section's bash blocks, as argv lists."""
    text = (REPO / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            if cmd.strip().startswith("snakemake"):
                cmds.append(shlex.split(cmd))
    return cmds


def test_readme_commands_are_the_tests():
    """The README's commands, with our cluster's names and the test config, are the ones the test runs."""
    names = {"cpu": PARTITION, "gpu": PARTITION, "a100": GPU_MODEL}
    cmds = [
        [re.sub(r"=(\w+)$", lambda m: "=" + names.get(m.group(1), m.group(1)), t) for t in c]
        for c in _readme_commands("Running on a SLURM cluster")
    ]
    configs = ["config/test.yaml", "overlay.yaml"]
    for cmd in cmds:
        i = cmd.index("--configfile")
        cmd[i + 1 : i + 2] = configs
        if "--cores" in cmd:  # the machine's cores, like the cluster's names
            cmd[cmd.index("--cores") + 1] = local_argv(configs)[2]
    assert slurm_argv(configs) in cmds, cmds
    assert local_argv(configs) in cmds, cmds


def test_parse_records_reads_scontrol_and_jobcomp_lines():
    """Values with spaces are kept whole; runs of spaces and the trailing one are not part of a value."""
    line = "JobId=7 JobName=a b Comment=rule_train_wildcards_1_8_0_0  ExitCode=0:0 \n\nJobId=8 Reason=None"
    assert parse_records(line) == [
        {"JobId": "7", "JobName": "a b", "Comment": "rule_train_wildcards_1_8_0_0", "ExitCode": "0:0"},
        {"JobId": "8", "Reason": "None"},
    ]
