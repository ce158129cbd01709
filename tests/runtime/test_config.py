"""The schema's helpers: which keys may differ between runs (`neutral`, `resumable`), configs an older
fgvr stored (`upgrade`, `with_defaults`), and `instantiate`'s one-line errors."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from fgvr.runtime.config import config_dir, instantiate, neutral, resumable, upgrade, with_defaults
from fgvr.runtime.errors import ConfigError

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
OLD_FORMATS = {"synth": "cub", "nabirds": "cub", "inat2017": "inat"}


@pytest.mark.parametrize("key,is_neutral,is_resumable", [
    ("seed", True, False),  # tables average over it; a resumed run with another seed is another run
    ("trainer.epochs", False, True),  # a resumed run may train on for longer
    ("trainer.devices", False, True),
    ("data.skip_bad", False, True),
    ("data.root", True, True),
    ("trainer.compile", True, True),
    ("trainer.export_backbone", True, True),
    ("logger.project", True, True),  # the whole section
    ("paths.cache_dir", True, True),
    ("name", True, True),
    ("resume", True, True),
    ("hydra.run.dir", True, True),
    ("optim.lr", False, False),
    ("data.synth.seed", False, False),  # the generator's seed: other images
    ("selector.top_k", False, False),  # outside the schema
    ("optim.name", False, False),
])
def test_which_keys_may_differ(key, is_neutral, is_resumable):
    assert (neutral(key), resumable(key)) == (is_neutral, is_resumable)


def downgrade(config: dict) -> dict:
    """A config of today's as fgvr wrote it before optim, logger and backbone named their `_target_`
    and data.format named the data set."""
    old = copy.deepcopy(config)
    optim, logger, data = old["optim"], old["logger"], old["data"]
    optim["name"] = optim.pop("_target_").rsplit(".", 1)[-1].lower()
    optim["momentum"], optim["betas"] = optim["momentum"] or 0.9, optim["betas"] or [0.9, 0.999]
    logger["name"] = "wandb" if logger.pop("_target_") else "none"
    del old["backbone"]["_target_"]
    data["format"] = OLD_FORMATS.get(data["format"], data["format"])
    return old


@pytest.mark.parametrize("overrides", [[], ["optim=sgd", "logger=wandb"], ["data=synth_parts"],
                                       *[[f"+experiment={e}", "data.root=/data"] for e in EXPERIMENTS]])
def test_an_older_config_upgrades_to_the_one_composed_today(compose, overrides):
    today = OmegaConf.to_container(compose(*overrides), resolve=True, enum_to_str=True)
    assert upgrade(today) is today  # today's is left as it is
    assert upgrade(downgrade(today)) == today


def test_an_older_data_set_of_ones_own_name_keeps_no_totals_to_check():
    old = {"optim": {"name": "adamw"}, "data": {"name": "my_birds", "format": "cub", "check_counts": True}}
    assert upgrade(old)["data"] == {"name": "my_birds", "format": "cub", "check_counts": False}
    assert old["data"]["check_counts"]  # the config given is left as it was


def test_with_defaults_adds_what_an_older_config_lacks():
    old = {"trainer": {"epochs": 3}, "data": {"name": "synth", "synth": {"num_classes": 4}}, "selector": {}}
    filled = with_defaults(old)
    assert filled["trainer"]["epochs"] == 3 and filled["trainer"]["grad_checkpointing"] is False
    assert filled["data"]["cache"] == "none" and filled["data"]["check_counts"] is True
    assert filled["data"]["synth"]["num_classes"] == 4 and filled["data"]["synth"]["kind"] == "discs"
    assert filled["selector"] == {} and filled["logger"]["_target_"] is None
    assert "format" not in filled["data"]  # no default: kept absent


def test_a_key_the_target_does_not_take_is_one_line(compose):
    from fgvr.engine.optim import build_optimizer

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError) as e:
        build_optimizer(model, compose("optim.momentum=0.9").optim, torch.device("cpu"), 0.1)  # AdamW's
    assert str(e.value) == ("optim.momentum: no such option; optim takes betas, eps, amsgrad, maximize, capturable, "
                            "differentiable")
    with pytest.raises(ConfigError, match=r"^optim._target_=torch.optim.Lion: no such class or function"):
        build_optimizer(model, compose("optim._target_=torch.optim.Lion").optim, torch.device("cpu"), 0.1)
    with pytest.raises(ConfigError, match=r"^texture.bogus: no such option; texture takes regions, region_size,"):
        instantiate("texture", {"_target_": "fgvr.models.texture.GaborTexture", "bogus": 1}, in_features=8)


def test_a_checkpoint_with_an_older_fgvrs_keys_evaluates(train_run, tmp_path):
    """eval and viz rebuild a run from its checkpoint's config, which an older fgvr wrote in its keys."""
    from fgvr.engine.evaluate import evaluate, load_run
    from fgvr.runtime import checkpoint

    results, run_dir = train_run("trainer.epochs=1", "optim=sgd", run_dir=tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state["config"] = downgrade(state["config"])
    checkpoint.atomic_save(state, last)
    run = load_run(str(run_dir))
    assert run.cfg.optim._target_ == "torch.optim.SGD" and run.cfg.data.format == "synth"
    again = evaluate(run.model, run.loaders.test, run.device, None)
    assert again["acc"] == pytest.approx(results["test_acc"])
