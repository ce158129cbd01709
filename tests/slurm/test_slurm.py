"""Sweeps on a real SLURM cluster (scripts/slurm_cluster.sh brings one up on localhost; `make
test-slurm` starts it, runs these and stops it): array jobs, time limits that requeue a run
which then resumes, jobs that die, and one DDP run over two SLURM tasks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from fgvr.runtime.tracker import read_events
from tests.conftest import FGVR, TINY

pytestmark = pytest.mark.slurm

# The test cluster is one node with 2 CPUs and no GPU.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="session")
def slurm() -> dict[str, str]:
    """The environment of a running SLURM cluster, or a skip that says how to get one."""
    conf = os.environ.get("SLURM_CONF")
    how = "start one with `scripts/slurm_cluster.sh start` and export SLURM_CONF (`make test-slurm` does both)"
    if not conf or not shutil.which("sbatch"):
        pytest.skip(f"no SLURM cluster (SLURM_CONF unset or no sbatch): {how}")
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or "idle" not in probe.stdout + probe.stderr and "mix" not in probe.stdout:
        pytest.skip(f"the SLURM cluster of {conf} does not answer ({(probe.stderr or probe.stdout).strip()}): {how}")
    return dict(os.environ)


def sweep(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(FGVR), "train", "--multirun", *TINY, *SLURM, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_a_sweep_is_one_array_job_and_every_run_finishes(slurm, tmp_path):
    marker = tmp_path / "setup_ran"
    out = sweep("seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.launcher.setup=['touch {marker}']",
                cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = [tmp_path / "sweep" / str(i) for i in range(2)]
    assert [results(r)["status"] for r in runs] == ["finished", "finished"]
    assert [results(r)["seed"] for r in runs] == [1, 2]
    array, tasks = zip(*(results(r)["slurm_job_id"].split("_") for r in runs))
    assert len(set(array)) == 1 and tasks == ("0", "1")  # one array job, a task per run
    assert marker.exists()  # hydra.launcher.setup ran before the job
    assert "2 runs, 2 finished" in out.stdout + out.stderr


def test_a_run_over_its_time_limit_is_requeued_and_resumes(slurm, tmp_path):
    """A 2-minute limit with the signal 50 s before it: the run saves at a step boundary, submitit
    requeues it, and the requeued job continues from that checkpoint in the same run dir (as many
    times as it takes). SLURM may send the signal up to 60 s early: with a 1-minute limit it came
    0.35 s after the start once, before Python could install a handler, and killed the job. The
    run is sized to take several minutes on a 2-core machine: one that finished within the first
    70 s on a faster CI machine was never signalled, and tested nothing."""
    out = sweep("seed=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=2",
                "hydra.launcher.signal_delay_s=50", "hydra.launcher.max_num_timeout=10", "trainer.epochs=100",
                "data.synth.train_per_class=400", "trainer.log_every=5", cwd=tmp_path, timeout=1800)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "sweep" / "0"
    final = results(run_dir)
    assert final["status"] == "finished" and final["epochs"] == 100
    events = read_events(run_dir / "metrics.jsonl")
    marks = [e for e in events if "event" in e]
    assert marks and marks[0]["event"] == "interrupted" and marks[0]["signal"] == "SIGUSR2"
    resumed = [e for e in marks if e["event"] == "resumed"]
    assert resumed and resumed[0]["step"] == marks[0]["step"]  # from the checkpoint the signal saved
    steps = [e["step"] for e in events if e.get("split") == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == final["steps"]  # step numbers continue, none twice
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == [".submitit", "0", "multirun.yaml"]


def test_a_job_that_dies_is_reported_failed_not_waited_for(slurm, tmp_path):
    """A job killed outright (here by a CPU-time limit: SIGXCPU, then SIGKILL) leaves no result;
    SLURM's accounting tells the launcher the job failed, and fgvr says so and exits 1."""
    start = time.time()
    out = sweep("seed=1", "trainer.epochs=500", "hydra.launcher.setup=['ulimit -t 20']",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, timeout=300)
    output = out.stdout + out.stderr
    assert out.returncode == 1 and time.time() - start < 150, output
    assert "1 runs, 1 no results" in output and "fgvr train: error: SLURM job" in output, output
    assert len(output.strip().splitlines()[-1]) < 400  # one line, not the job's whole log


def test_two_tasks_train_one_ddp_run(slurm, tmp_path):
    """tasks_per_node=2: the two SLURM tasks are the two ranks of one DDP run (gloo on the CPU)."""
    out = sweep("seed=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.tasks_per_node=2", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = tmp_path / "sweep" / "0"
    final = results(run_dir)
    assert final["status"] == "finished" and final["world_size"] == 2
    assert len([e for e in read_events(run_dir / "metrics.jsonl") if e.get("split") == "test"]) == 1
    log = (run_dir / "train.log").read_text()
    assert "test acc" in log and "[rank 1]" not in log


def test_an_optuna_study_launches_its_trials_as_array_jobs(slurm, tmp_path):
    """+hparams_search=optuna with n_jobs=2: each batch of trials is one array job; the study's best
    trial is the one with the highest best_val_acc."""
    sweep_dir = tmp_path / "sweep"
    out = sweep("+hparams_search=optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
                f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = [results(sweep_dir / str(i)) for i in range(4)]
    assert [r["status"] for r in runs] == ["finished"] * 4
    arrays = [r["slurm_job_id"].split("_")[0] for r in runs]
    assert arrays[0] == arrays[1] != arrays[2] == arrays[3]  # two batches, one array job each
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == max(r["best_val_acc"] for r in runs)
