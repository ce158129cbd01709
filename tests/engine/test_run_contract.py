"""The run directory's contract: relaunches that rewrite nothing, a lock, refusals that leave
the dir untouched, eval/viz outputs that go only where they belong."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fgvr.commands.eval import evaluate_checkpoint
from fgvr.commands.viz import visualise
from fgvr.runtime.config import EvalConfig, VizConfig
from fgvr.runtime.errors import ConfigError, FgvrError
from fgvr.runtime.rundir import RunDir
from fgvr.runtime.tracker import read_events
from tests.conftest import TINY, fgvr


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its content and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a `fgvr train` and three relaunches (~30 s)
def test_relaunching_a_finished_run_rewrites_nothing(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    fgvr("train", *args, cwd=tmp_path)
    before = snapshot(run_dir)
    again = fgvr("train", *args, cwd=tmp_path)  # the same command: its results, exit 0
    assert "finished before" in again.stdout and snapshot(run_dir) == before
    for extra, message in [(["optim.lr=0.1"], "was trained with other settings (optim.lr)"),
                           ([f"data.root={tmp_path}"], "holds a finished run trained on data.root=None")]:
        proc = fgvr("train", *args, *extra, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert snapshot(run_dir) == before  # .hydra/, train.log and results.json included


def test_resume_evaluate_updates_only_what_evaluation_measures(train_run):
    results, run_dir = train_run("trainer.epochs=1")
    results_again, _ = train_run("trainer.epochs=1", "resume=evaluate")
    assert results_again["test_acc"] == pytest.approx(results["test_acc"])
    for kept in ("train_img_per_s", "data_wait_pct", "wall_time_s", "best_val_acc", "steps", "peak_mem_mb"):
        assert results_again[kept] == results[kept], kept
    assert results_again["eval_img_per_s"] != results["eval_img_per_s"] and "evaluated_at" in results_again
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(json.dumps(results_again))
    with pytest.raises(ConfigError, match="holds no finished run"):
        train_run("trainer.epochs=2", "resume=evaluate")


def test_a_finished_run_without_its_checkpoint_is_not_trained_over(train_run):
    _, run_dir = train_run("trainer.epochs=1")
    RunDir(run_dir).last.unlink()
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(ConfigError, match="holds a finished run"):
        train_run("trainer.epochs=1")
    assert (run_dir / "results.json").read_bytes() == before


def test_data_root_change_on_resume_is_recorded(train_run, cub_root, tmp_path):
    import shutil

    data = ["data=cub", "trainer.epochs=1", "data.batch_size=4"]
    train_run(*data, f"data.root={cub_root}")
    moved = tmp_path / "moved"
    shutil.copytree(cub_root, moved)
    # trainer.epochs=2: the run is not finished, so it may go on with its data elsewhere
    results, run_dir = train_run(*data[:1], "trainer.epochs=2", "data.batch_size=4", f"data.root={moved}")
    assert results["status"] == "finished"
    (event,) = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("event") == "data_root_changed"]
    assert event["old"] == str(cub_root) and event["new"] == str(moved)


def test_two_launches_into_one_run_dir(train_run, tmp_path):
    run_dir = tmp_path / "run"
    with RunDir(run_dir).locked():  # another process writing the dir (flock: another open file too)
        with pytest.raises(FgvrError, match="another fgvr process is writing this run dir"):
            train_run("trainer.epochs=1")
    assert not (run_dir / "results.json").exists() and not (run_dir / "metrics.jsonl").exists()
    results, _ = train_run("trainer.epochs=1")  # once the lock is free
    assert results["status"] == "finished"


def test_default_run_dirs_of_one_second_differ(compose):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from fgvr.runtime.config import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        dirs = set()
        for _ in range(3):
            cfg = hydra_compose("train", return_hydra_config=True)
            dirs.add(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])
            time.sleep(0.001)
    assert len(dirs) == 3  # sub-second names


@pytest.mark.parametrize("override, message", [
    ("data.img_size=0", "data.img_size=0: must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.num_workers=-3", "data.num_workers=-3: must be >= 0"),
    ("trainer.epochs=-1", "trainer.epochs=-1: must be >= 1"),
    ("data.val_fraction=1.5", "data.val_fraction=1.5: must be in [0, 1)"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
])
def test_values_out_of_range_stop_before_the_run(train_run, tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        train_run(override)
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()  # the empty dir made for the run is gone


def test_values_out_of_range_on_the_command_line_leave_no_run_dir(tmp_path):
    proc = fgvr("train", "data.batch_size=0", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr == "fgvr train: error: data.batch_size=0: must be >= 1\n"
    assert not list(tmp_path.glob("outputs/**/*_synth"))


def test_eval_and_viz_of_a_loose_checkpoint_write_only_to_out(train_run, tmp_path):
    import shutil

    _, run_dir = train_run("trainer.epochs=1")
    loose = tmp_path / "elsewhere" / "model.pt"
    loose.parent.mkdir()
    shutil.copy(RunDir(run_dir).last, loose)
    with pytest.raises(ConfigError, match="is not inside a run dir.*out=PATH"):
        evaluate_checkpoint(EvalConfig(ckpt=str(loose)))
    with pytest.raises(ConfigError, match="is not inside a run dir"):
        visualise(VizConfig(ckpt=str(loose), n=1))
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and "run" not in p.parts) == ["model.pt"]
    out = tmp_path / "eval.json"
    assert evaluate_checkpoint(EvalConfig(ckpt=str(loose), out=str(out)))["images"] == 32
    assert json.loads(out.read_text())["checkpoint"] == str(loose)


def test_eval_says_when_it_replaces_an_earlier_output(train_run, caplog):
    _, run_dir = train_run("trainer.epochs=1")
    evaluate_checkpoint(EvalConfig(ckpt=str(run_dir)))
    assert "replacing" not in caplog.text
    evaluate_checkpoint(EvalConfig(ckpt=str(run_dir)))
    assert f"replacing {run_dir / 'eval_test.json'}" in caplog.text


def test_a_forked_worker_does_not_keep_the_run_dir_locked(tmp_path):
    """A main process killed outright leaves .lock behind; its loader workers, which may outlive it
    for seconds, must not hold the lock against the job that resumes the run."""
    import os
    import signal

    from fgvr.runtime import rundir

    run = RunDir(tmp_path)
    started, ready = os.pipe()
    fd = run._acquire()
    rundir._held.add(fd)
    child = os.fork()
    if child == 0:  # a data loader worker
        os.write(ready, b"1")
        time.sleep(30)
        os._exit(0)
    os.read(started, 1)
    rundir._held.discard(fd)
    os.close(fd)  # the main process dies: no clean-up
    try:
        with run.locked():  # the lock went with the process that took it
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_resume_from_another_checkpoint_never_trains_over_a_run(train_run, tmp_path):
    _, source = train_run("trainer.epochs=1", run_dir=tmp_path / "source")
    results, target = train_run("trainer.epochs=2", f"resume={source}", run_dir=tmp_path / "target")
    assert results["status"] == "finished" and results["steps"] == 10  # went on from the source's epoch 1
    before = snapshot(target)
    again, _ = train_run("trainer.epochs=2", f"resume={source}", run_dir=target)  # the same command again
    assert again == json.loads((target / "results.json").read_text()) and snapshot(target) == before
    with pytest.raises(ConfigError, match="already holds a run that did not start from that checkpoint"):
        train_run("trainer.epochs=2", f"resume={source / 'checkpoints' / 'best.pt'}", run_dir=target)
    assert snapshot(target) == before


def test_a_sweep_job_with_a_value_out_of_range_is_counted_as_failed(tmp_path):
    proc = fgvr("train", "--multirun", *TINY, "trainer.epochs=1", "data.batch_size=16,0",
                f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "1 of 2 runs did not finish" in proc.stderr
    failed = json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())
    assert failed == {"status": "failed", "error": "ConfigError: data.batch_size=0: must be >= 1"}


def test_eval_never_replaces_what_it_did_not_write(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")
    for target in (RunDir(run_dir).last, RunDir(run_dir).results, tmp_path / "notes.json", tmp_path):
        if target.suffix == ".json" and not target.exists():
            target.write_text('{"mine": 1}')
        before = target.read_bytes() if target.is_file() else None
        with pytest.raises(ConfigError, match="something else is there already"):
            evaluate_checkpoint(EvalConfig(ckpt=str(run_dir), out=str(target)))
        assert (target.read_bytes() if target.is_file() else None) == before
    with pytest.raises(ConfigError, match="something else is there already"):
        visualise(VizConfig(ckpt=str(run_dir), n=1, out=str(RunDir(run_dir).results)))


def test_eval_and_viz_refuse_a_run_being_written(train_run):
    _, run_dir = train_run("trainer.epochs=1")
    with RunDir(run_dir).locked():  # a relaunch still training into the dir
        with pytest.raises(FgvrError, match="a process is writing this run dir.*out=PATH"):
            evaluate_checkpoint(EvalConfig(ckpt=str(run_dir)))
        with pytest.raises(FgvrError, match="a process is writing this run dir"):
            visualise(VizConfig(ckpt=str(run_dir), n=1))
    assert not RunDir(run_dir).eval_file("test").exists() and not RunDir(run_dir).viz.exists()


def test_a_refused_relaunch_changes_nothing(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")
    before = snapshot(run_dir)
    for args, message in [(["trainer.epochs=2", "optim.lr=0.1"], "trained with other settings"),  # unfinished
                          (["trainer.epochs=1", "resume=never"], "already holds a run"),
                          (["trainer.epochs=3", "resume=evaluate"], "holds no finished run")]:
        with pytest.raises(ConfigError, match=message):
            train_run(*args)
        assert snapshot(run_dir) == before, args
    with RunDir(run_dir).locked():
        with pytest.raises(FgvrError, match="another fgvr process"):
            train_run("trainer.epochs=2")
    assert {p: v for p, v in snapshot(run_dir).items() if p != ".lock"} == before


def test_viz_never_touches_files_it_did_not_write(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("test_000.png", "test_017.png", "notes.txt"):
        (photos / name).write_text(name)
    before = snapshot(photos)
    with pytest.raises(ConfigError, match="something else is there already"):
        visualise(VizConfig(ckpt=str(run_dir), n=2, out=str(photos)))
    assert snapshot(photos) == before
    figures = tmp_path / "figures"
    visualise(VizConfig(ckpt=str(run_dir), n=3, out=str(figures)))
    visualise(VizConfig(ckpt=str(run_dir), n=1, out=str(figures)))  # its own earlier figures: replaced
    assert sorted(p.name for p in figures.iterdir()) == ["test_000.png", "viz.json"]
