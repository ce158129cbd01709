"""The end of a multirun: every run's status and dir, and a non-zero exit if one did not finish."""

from __future__ import annotations

import json

from fgvr.commands.sweep import format_summary, sweep_runs
from tests.conftest import TINY, fgvr


def test_statuses_come_from_each_run_dir(tmp_path):
    for i, results in enumerate([{"status": "finished", "test_acc": 91.25},
                                 {"status": "failed", "error": "DataError: x.jpg: truncated image file"},
                                 {"status": "interrupted", "signal": "SIGUSR2", "steps": 40}, None]):
        (tmp_path / str(i) / ".hydra").mkdir(parents=True)
        (tmp_path / str(i) / ".hydra" / "overrides.yaml").write_text(f"- seed={i}\n- hydra.job.num={i}\n")
        if results is not None:
            (tmp_path / str(i) / "results.json").write_text(json.dumps(results))
    (tmp_path / ".submitit").mkdir()
    runs = sweep_runs(tmp_path)
    assert [(r.dir.name, r.status, r.overrides) for r in runs] == [
        ("0", "finished", "seed=0"), ("1", "failed", "seed=1"), ("2", "interrupted", "seed=2"),
        ("3", "no results", "seed=3")]
    text = format_summary(tmp_path, runs)
    assert text.splitlines()[0] == f"sweep {tmp_path}: 4 runs, 1 failed, 1 finished, 1 interrupted, 1 no results"
    assert "test acc 91.25 %" in text and "DataError: x.jpg: truncated image file" in text
    assert "stopped by SIGUSR2 at step 40" in text


def test_a_local_submitit_sweep_reports_each_run_and_fails_if_one_did(tmp_path):
    """hydra/launcher=slurm_local runs the sweep as local processes; a run that fails is listed
    with its error and the command exits 1 after the others have finished."""
    out = fgvr("train", "--multirun", "hydra/launcher=slurm_local", *TINY, "trainer.epochs=1",
               "trainer.accum_steps=1,99", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"sweep {tmp_path / 'sweep'}: 2 runs, 1 failed, 1 finished" in out.stdout + out.stderr
    assert "trainer.accum_steps=99 is more than the 5 batches" in out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"fgvr train: error: 1 of 2 runs did not finish (listed above), "
                                                   f"e.g. {tmp_path / 'sweep' / '1'}")
    assert json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())["status"] == "finished"


def test_slurm_launcher_defaults(tmp_path):
    out = fgvr("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra",
               "--package", "hydra.launcher", cwd=tmp_path)
    from omegaconf import OmegaConf

    launcher = OmegaConf.to_container(OmegaConf.create(out.stdout.split("# @package hydra.launcher", 1)[-1]))
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu"
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] >= 60  # time limits requeue and resume
    assert launcher["tasks_per_node"] == 1 and launcher["cpus_per_task"] and launcher["mem_gb"]
    assert launcher["name"] == "fgvr-${name}" and launcher["setup"] == []


def test_two_local_submitit_tasks_are_one_ddp_run(tmp_path):
    out = fgvr("train", "--multirun", "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2", *TINY,
               "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    results = json.loads((tmp_path / "sweep" / "0" / "results.json").read_text())
    assert results["status"] == "finished" and results["world_size"] == 2
    assert results["steps"] == 2 and results["test_images"] == 32  # 32 images a step; each test image once
    assert "1 runs, 1 finished" in out.stdout + out.stderr
