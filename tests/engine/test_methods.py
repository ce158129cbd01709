"""The methods with a forward of their own (method=transfg|ffvt|ielt|cal) through the trainer, the
evaluation, the cost report and `fgvr viz`: one trainer for all of them, their loss terms logged by
name, what they selected scored against the ground-truth boxes."""

from __future__ import annotations

import contextlib
import inspect
import json
import signal
from pathlib import Path

import pytest
import torch

from fgvr.commands import viz
from fgvr.engine import trainer
from fgvr.runtime import checkpoint
from fgvr.runtime.config import VizConfig
from fgvr.runtime.errors import ConfigError
from fgvr.runtime.tracker import RunLogger, read_events
from tests.conftest import TINY
from tests.engine.test_bench import QUICK, STEP_KEYS
from tests.engine.test_trainer import watching_forwards

CNN = ["backbone=resnet_micro"]
METHODS = {"transfg": [], "ffvt": [], "ielt": [], "cal": CNN}
TOKENS = ("transfg", "ffvt", "ielt")  # the token-selecting ones
STAGE = {"transfg": "selection", "ffvt": "selection", "ielt": "selection", "cal": "attention"}


@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_in_bf16_and_logs_its_loss_terms(train_run, name):
    import torch

    with watching_forwards() as forwards:
        results, run_dir = train_run("trainer.epochs=1", "trainer.precision=bf16", f"method={name}", *METHODS[name],
                                     choices={"method": name})
    assert results["status"] == "finished" and results["method"] == name
    assert {f.dtype for f in forwards if f.name == "Linear" and f.training} == {torch.bfloat16}
    train = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("split") == "train"]
    terms = sorted(k for k in train[0] if k.startswith("loss_"))
    if name == "ffvt":  # its one term, the cross-entropy, is the loss itself
        assert terms == []
    else:
        assert len(terms) >= 2, terms
        for event in train:
            assert sum(event[k] for k in terms) == pytest.approx(event["loss"], rel=1e-4), (terms, event)
    flops = results["cost"]["gflops_per_image"]
    assert flops["encoder"] > 0 and flops[STAGE[name]] > 0
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"), abs=1e-5)
    assert 0 <= results["crop_iou"] <= 1 and 0 <= results["crop_hit"] <= 100  # the box around tokens, CAL's crop
    assert (results["token_hit"] is not None) == (name in TOKENS)


def test_a_single_loss_term_is_not_logged_again(train_run):
    _, run_dir = train_run("trainer.epochs=1")
    train = [e for e in read_events(run_dir / "metrics.jsonl") if e.get("split") == "train"]
    assert train and not any(k.startswith("loss_") for e in train for k in e)


@pytest.mark.parametrize("overrides, error", [
    (["method=transfg", "selector=glsim"], "method=transfg selects its own regions; it takes no selector"),
    (["method=ffvt", "texture=gabor"], "method=ffvt selects its own regions; it takes no texture branch"),
    (["method=ielt", "head=aggregator"], "method=ielt brings its own classifier"),
    (["method=cal"], "method=cal: needs a CNN backbone"),
    (["method=transfg", *CNN], "method=transfg: needs a ViT backbone"),
    (["method=transfg", "trainer.grad_checkpointing=true"], "trainer.grad_checkpointing=true is not supported"),
    (["method=transfg", "+method.bogus=1"], "method.bogus: no such option; method takes"),
])
def test_a_method_refuses_what_it_replaces_in_one_line(compose, overrides, error):
    from fgvr.models.model import build_model

    with pytest.raises(ConfigError, match=error):
        build_model(compose(*overrides), 3)


@pytest.mark.parametrize("name", ["transfg", "cal"])
def test_viz_shows_the_selected_tokens_or_the_attention_and_crop(train_run, monkeypatch, name):
    _, run_dir = train_run("trainer.epochs=1", f"method={name}", *METHODS[name])
    calls = []
    render = viz.render
    monkeypatch.setattr(viz, "render", lambda *a, **kw: calls.append(inspect.signature(render).bind(*a, **kw).arguments)
                        or render(*a, **kw))
    (path,) = viz.visualise(VizConfig(ckpt=str(run_dir), n=1))
    shown = calls[0]
    box, crop_img, scores, tokens = shown["box"], shown["crop_img"], shown["scores"], shown.get("tokens")
    assert box is not None and path.stat().st_size > 0
    if name == "transfg":  # one patch per head (vit_micro: 3), the box around them, no crop
        assert len(tokens) == 3 and crop_img is None and scores is None
        assert all(t[2] - t[0] == 8 and t[3] - t[1] == 8 for t in tokens)
        assert box[0] == min(t[0] for t in tokens) and box[2] == max(t[2] for t in tokens)
    else:  # CAL: its attention maps' mean as the heat map, and its crop
        assert tokens is None and crop_img is not None and scores is not None and scores.ndim == 2


# --- Resume, compile, bench and eval for each method -------------------------------------------------------------

# IELT's rates move from its first forward (update_warm=0), so its buffers differ from their initial values.
STATEFUL = {**METHODS, "ielt": ["method.update_warm=0"]}
# 2 steps an epoch (43 train images), 4 in all: stopped after the first, the resumed run crosses an epoch's end.
RESUMED = ("trainer.epochs=2", "trainer.log_every=1", "trainer.deterministic=true", "data.synth.train_per_class=12")


@contextlib.contextmanager
def _no_cost_report():
    """Runs without the cost report at their end (a CAL run's most expensive part here; the bf16 test checks it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "_cost", lambda session: None)
        yield


def _compose_train(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return hydra_compose("train", overrides=[*TINY, *overrides])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """name -> (results, run dir) of an uninterrupted 2-epoch run of that method, trained once per
    module: the reference of the resume test and the run the eval test evaluates."""
    from fgvr.runtime.tracker import RunInfo

    runs: dict = {}

    def get(name: str):
        if name not in runs:
            run = RunInfo(tmp_path_factory.mktemp(f"whole_{name}"), "test", choices={"method": name})
            with _no_cost_report():
                runs[name] = trainer.train(_compose_train(*RESUMED, f"method={name}", *STATEFUL[name]), run), run.dir
        return runs[name]

    return get


def _stopped_at(train_run, monkeypatch, step: int, *overrides: str, run_dir: Path):
    """A run that a SIGUSR2 stops at `step` (inside the loop, as the trainer's handler catches it)."""
    log = RunLogger.log

    def log_then_signal(self, **event):
        log(self, **event)
        if event.get("split") == "train" and event["step"] == step:
            signal.raise_signal(signal.SIGUSR2)

    monkeypatch.setattr(RunLogger, "log", log_then_signal)
    try:
        return train_run(*overrides, run_dir=run_dir)
    finally:
        monkeypatch.setattr(RunLogger, "log", log)


@pytest.mark.parametrize("name", METHODS)
def test_a_method_run_stopped_mid_epoch_resumes_exactly(train_run, uninterrupted, monkeypatch, stray_signals,
                                                        tmp_path, name):
    """Stopped at step 1 of 4 and relaunched, a method's run ends where an uninterrupted one does:
    CAL's class centres and IELT's rates and forward count are in last.pt and come back, and the
    RNG state covers what the methods draw (CAL's random maps, crop and drop thresholds)."""
    from fgvr.models.methods.ielt import initial_rates

    args = (*RESUMED, f"method={name}", *STATEFUL[name])
    whole, whole_dir = uninterrupted(name)
    with _no_cost_report():
        stopped, run_dir = _stopped_at(train_run, monkeypatch, 1, *args, run_dir=tmp_path / "cut")
    assert stray_signals == []
    assert stopped["status"] == "interrupted" and stopped["steps"] == 1 and whole["steps"] == 4
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert (state["epoch"], state["position"]) == (0, 16)  # in the middle of the first epoch
    saved = state["model"]
    if name == "cal":
        assert saved["method.centres"].abs().sum() > 0  # moved from zero, and saved
    if name == "ielt":
        assert int(saved["method.steps"]) == 1  # one training forward a step
        assert not torch.allclose(saved["method.select_rate"], initial_rates("v", 3))  # vit_micro: 4 blocks

    with _no_cost_report():
        resumed, _ = train_run(*args, run_dir=run_dir)
    assert resumed["status"] == "finished"
    for key in ("test_acc", "test_loss", "best_val_acc", "best_epoch", "steps", "token_hit", "crop_iou"):
        assert resumed[key] == whole[key], key
    logged = [[{k: v for k, v in e.items() if k != "img_per_s"} for e in read_events(d / "metrics.jsonl")
               if "event" not in e] for d in (whole_dir, run_dir)]
    assert logged[1] == logged[0]  # every train, val and test event, each loss term included
    a, b = (checkpoint.load(d / "checkpoints" / "last.pt")["model"] for d in (whole_dir, run_dir))
    assert a.keys() == b.keys()
    for k in a:  # the weights and every buffer, the methods' own included
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", METHODS)
def test_eval_of_a_method_run_reproduces_its_test_figures(uninterrupted, name):
    from fgvr.commands.eval import evaluate_checkpoint
    from fgvr.runtime.config import EvalConfig

    results, run_dir = uninterrupted(name)
    evaluated = evaluate_checkpoint(EvalConfig(ckpt=str(run_dir)))
    assert evaluated == json.loads((run_dir / "eval_test.json").read_text())
    assert evaluated["acc"] == pytest.approx(results["test_acc"]) and evaluated["epoch"] == 2
    assert evaluated["loss"] == pytest.approx(results["test_loss"], rel=1e-6)
    assert evaluated["crop_iou"] == pytest.approx(results["crop_iou"])
    if name in TOKENS:
        assert 0 <= evaluated["token_hit"] <= 100 and evaluated["token_hit"] == pytest.approx(results["token_hit"])
    else:
        assert "token_hit" not in evaluated and results["token_hit"] is None


# CAL's gradients are ill-conditioned in float32 (the signed square root of the pooled features, their
# normalisation, the logits 100x that): eager's own differ from float64's by ~3 % at the first step, and
# Adam carries any reassociation on from step 2 or 3. The others match as the plain model does.
COMPILE_REL = {"transfg": 1e-4, "ffvt": 1e-4, "ielt": 1e-4, "cal": 2e-2}


@pytest.mark.slow  # compiles each method's training step and its evaluation (15-75 s each on 2 cores)
@pytest.mark.parametrize("name", METHODS)
def test_a_compiled_method_trains_as_the_eager_one(train_run, tmp_path, name):
    """trainer.compile=true: a method's forward (its selection, buffer updates and loss terms) through
    torch.compile's graphs trains step by step to the losses, weights, buffers and test figures of an
    eager run, up to float reassociation. fallback_random: the compiled code draws CAL's random maps
    and thresholds from torch's generator, as eager does, not from a stream of its own."""
    from torch._dynamo.utils import counters

    common = ["trainer.epochs=1", "trainer.deterministic=true", "trainer.log_every=1", f"method={name}",
              *STATEFUL[name]]
    eager, eager_dir = train_run(*common, run_dir=tmp_path / "eager")
    counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        compiled, compiled_dir = train_run(*common, "trainer.compile=true", run_dir=tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0 and compiled["compile_s"] > 0 and eager["compile_s"] is None
    rel = COMPILE_REL[name]
    train = [[e for e in read_events(d / "metrics.jsonl") if e.get("split") == "train"]
             for d in (eager_dir, compiled_dir)]
    assert len(train[0]) == len(train[1]) == 5
    for key in [k for k in train[0][0] if k == "loss" or k.startswith("loss_")]:
        first, then = ([e[key] for e in run] for run in train)
        assert then[:2] == pytest.approx(first[:2], rel=1e-4), key  # the same draws: the same first steps
        assert then == pytest.approx(first, rel=rel, abs=1e-6), key
    assert compiled["test_loss"] == pytest.approx(eager["test_loss"], rel=rel)
    assert compiled["test_acc"] == pytest.approx(eager["test_acc"], abs=100 / 32 if name == "cal" else 0)  # an image
    if name in TOKENS:
        assert compiled["token_hit"] == pytest.approx(eager["token_hit"], abs=1e-6)
    a, b = (checkpoint.load(d / "checkpoints" / "last.pt")["model"] for d in (eager_dir, compiled_dir))
    assert a.keys() == b.keys()  # the compiled wrapper's names do not leak into the checkpoint
    for k in a:  # weights and buffers: CAL's centres, IELT's rates and its forward count among them
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4 if rel < 1e-3 else 5e-2), k


@pytest.fixture
def bench_method():
    """`fgvr bench method=<name>`, in-process: bench.yaml composed as the command does (its schema
    in place of train's, restored after), briefly (test_bench.py's QUICK settings, fewer steps)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fgvr.engine.bench import bench
    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas(bench=True)

    def _bench(name: str) -> dict:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = hydra_compose("bench", overrides=[*QUICK, "bench.steps=2", "bench.eval_steps=1", f"method={name}",
                                                    *METHODS[name]])
        return bench(cfg, {"method": name})  # Hydra's group choices, as `fgvr bench` passes them

    yield _bench
    register_schemas()


@pytest.mark.parametrize("name", METHODS)
def test_bench_times_each_methods_step(bench_method, capsys, name):
    """`fgvr bench method=...`: the trainer's step of the method, timed and split, its stage FLOPs, and
    the method named in bench.json and in the table."""
    out = bench_method(name)
    for key in ("train_img_per_s", "model_train_img_per_s", "eval_img_per_s", "model_eval_img_per_s",
                "data_img_per_s", "train_tflops", "peak_mem_mb"):
        assert out[key] > 0, key
    steps = out["step_ms"]
    assert set(steps) == STEP_KEYS and all(v >= 0 for v in steps.values())
    assert steps["select_crop"] == 0 and out["select_crop_pct"] is None  # a method's selection is in its forward
    split = sum(steps[k] for k in ("forward", "select_crop", "backward", "optimizer"))
    assert split == pytest.approx(steps["model_step"], rel=0.01)
    flops = out["gflops_per_image"]  # small stages keep 3 significant digits
    assert flops["encoder"] > 0 and flops[STAGE[name]] > 0
    assert flops["total"] == pytest.approx(sum(v for k, v in flops.items() if k != "total"), abs=1e-3)
    table = capsys.readouterr().out
    assert "train, whole loop" in table and "no results" not in table
    assert out["method"] == name and f"method={name}" in table
