"""The methods with a forward of their own (method=transfg|ffvt|ielt|cal) through the trainer, the
evaluation, the cost report and `fgvr viz`: one trainer for all of them, their loss terms logged by
name, what they selected scored against the ground-truth boxes."""

from __future__ import annotations

import inspect

import pytest

from fgvr.commands import viz
from fgvr.runtime.config import VizConfig
from fgvr.runtime.errors import ConfigError
from fgvr.runtime.tracker import read_events
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
