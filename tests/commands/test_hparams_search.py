"""`fgvr train -m +hparams_search=optuna`: Hydra's Optuna sweeper over lr, weight decay and label
smoothing, maximising best_val_acc; a failed trial is recorded as failed and the study goes on."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import TINY, fgvr


def test_the_search_space_and_objective():
    from hydra import compose, initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        sweeper = compose("train", ["+hparams_search=optuna"], return_hydra_config=True).hydra.sweeper
    assert "optuna" in sweeper._target_ and sweeper.direction == "maximize"
    assert dict(sweeper.params) == {"optim.lr": "tag(log, interval(1e-5, 1e-2))",
                                    "optim.weight_decay": "interval(0.0, 0.1)",
                                    "trainer.label_smoothing": "interval(0.0, 0.2)"}
    assert sweeper.max_failure_rate == 1.0  # a failed trial never ends the study


def test_a_run_returns_best_val_acc_to_the_sweeper(monkeypatch):
    """The value a sweeper maximises is the best val accuracy, never the test accuracy."""
    from fgvr import cli
    from fgvr.engine import trainer

    monkeypatch.setattr(trainer, "train", lambda cfg, run: {"status": "finished", "best_val_acc": 61.0,
                                                            "test_acc": 99.0})
    monkeypatch.setattr(cli, "_is_multirun", lambda: True)
    monkeypatch.setattr("fgvr.runtime.tracker.run_info", lambda name: None)
    assert cli._train_task(type("Cfg", (), {"name": "x"})()) == 61.0


@pytest.mark.slow  # a 3-trial study of 1-epoch runs (~30 s)
def test_a_study_maximises_best_val_acc_and_goes_on_after_a_failed_trial(tmp_path):
    """Sampler seed 1 draws trainer.epochs = 0, 1, 0: the first trial fails (epochs must be >= 1),
    the study goes on, and the best trial is the finished one, by its best val accuracy."""
    sweep = tmp_path / "sweep"
    tiny = [o for o in TINY if not o.startswith("trainer.epochs=")]
    out = fgvr("train", "--multirun", "+hparams_search=optuna", *tiny, "hydra.sweeper.n_trials=3",
               "hydra.sweeper.sampler.seed=1", "trainer.epochs=choice(0, 1)", f"hydra.sweep.dir={sweep}",
               cwd=tmp_path, check=False)
    log = out.stdout + out.stderr
    runs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    assert [r["status"] for r in runs] == ["failed", "finished", "failed"], log
    assert "trainer.epochs=0: must be >= 1" in runs[0]["error"]
    assert out.returncode == 1 and "fgvr train: error: 2 of 3 runs did not finish" in out.stderr, log
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == runs[1]["best_val_acc"] and best["best_params"]["trainer.epochs"] == 1
    drawn = yaml.safe_load((sweep / "1" / ".hydra" / "overrides.yaml").read_text())[:3]
    assert drawn == [f"{k}={best['best_params'][k]}" for k in ("optim.lr", "optim.weight_decay",
                                                                "trainer.label_smoothing")]


def test_a_search_without_a_val_split_is_refused_before_any_trial(capsys):
    from omegaconf import OmegaConf

    from fgvr.commands.sweep import SearchCheck

    config = OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper."
                                                                 "OptunaSweeper"}}, "data": {"val_fraction": 0.0}})
    with pytest.raises(SystemExit) as stop:
        SearchCheck().on_multirun_start(config)
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("fgvr train: error: hydra/sweeper=optuna maximises best_val_acc, and "
                                              "data.val_fraction=0 leaves no val split")
    SearchCheck().on_multirun_start(OmegaConf.merge(config, {"data": {"val_fraction": 0.1}}))  # a val split: fine
    SearchCheck().on_multirun_start(OmegaConf.create({"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins."
                                                                            "basic_sweeper.BasicSweeper"}},
                                                      "data": {"val_fraction": 0.0}}))  # no search: fine


def test_a_study_whose_every_trial_failed_ends_in_one_line():
    import optuna

    from fgvr.cli import user_error

    study = optuna.create_study()
    with pytest.raises(ValueError) as error:
        study.best_trial  # what the sweeper asks at the end
    assert user_error(error.value, "train") == (
        "every trial of the Optuna study failed (the sweep's runs are listed above)", 1)
    assert user_error(ValueError("No trials are completed yet."), "train") == (None, 0)  # not optuna's: a bug
