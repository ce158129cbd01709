"""Two training options through the trainer's own step (Session.step): batch mixing (data.augment.mixup
/ cutmix, timm's Mixup on the device batch before the forward) and the linear probe (backbone.freeze)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from timm.data import Mixup, mixup
from timm.data.mixup import mixup_target

from fgvr.engine.session import Session
from fgvr.models.methods.transfg import contrastive_loss
from fgvr.models.model import build_model
from fgvr.runtime.errors import ConfigError
from tests.conftest import TINY

BASE = [*TINY, "data.batch_size=4"]  # TINY's data set (made once per test session), 4 images a batch
CLASSES = 4  # TINY's
MIXUP, CUTMIX = "data.augment.mixup=1.0", "data.augment.cutmix=1.0"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def session(compose):
    """A Session on a composed config, on the CPU; the loaders closed at the end."""
    sessions = []

    def _session(*overrides: str) -> Session:
        sessions.append(Session(compose(*BASE, *overrides), torch.device("cpu")))
        return sessions[-1]

    yield _session
    for s in sessions:
        s.loaders.close()


def watch(s: Session) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """What the step's forward is given and gives: (images, targets, logits) per micro-batch."""
    seen = []

    def forward(images, boxes, targets):
        logits, extras = s.model(images, boxes, targets)
        seen.append((images.clone(), targets, logits.detach()))
        return logits, extras

    s.forward = forward
    return seen


@pytest.fixture
def lams(monkeypatch) -> list[float]:
    """The lambda of each batch timm's Mixup mixes (after cutmix's correction for the box's area)."""
    found = []
    mix = Mixup._mix_batch
    monkeypatch.setattr(Mixup, "_mix_batch", lambda self, x: found.append(mix(self, x)) or found[-1])
    return found


# --- Mixing ---------------------------------------------------------------------------------------------------------

def test_mixup_mixes_what_the_model_sees_and_the_loss_reads_the_mix_smoothed_once(session, lams):
    """The forward gets lam x + (1 - lam) x.flip(0) of the loader's batch, and the step's loss is the
    cross-entropy with timm's mixed, smoothed targets (not smoothed again, nor the hard labels');
    "correct" counts against the labels."""
    s = session(MIXUP, "trainer.label_smoothing=0.1")
    seen = watch(s)
    batches = next(s.epoch(0))
    totals = s.step(batches)
    (images, targets, logits), = seen
    (lam,) = lams
    x, labels = batches[0].images.float(), batches[0].labels
    assert 0 < lam < 1 and images.dtype == torch.float32 and not torch.equal(images, x)
    assert torch.allclose(images, lam * x + (1 - lam) * x.flip(0), atol=1e-4)
    assert torch.allclose(targets, mixup_target(labels, CLASSES, lam))
    loss = totals["loss"] / len(labels)
    smoothed = mixup_target(labels, CLASSES, lam, smoothing=0.1)  # timm's targets with the run's smoothing
    assert loss == pytest.approx(F.cross_entropy(logits, smoothed).item(), rel=1e-5)
    assert loss != pytest.approx(F.cross_entropy(logits, smoothed, label_smoothing=0.1).item(), rel=1e-4)
    assert loss != pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-4)
    assert totals["correct"] == (logits.argmax(-1) == labels).sum()


def test_correct_counts_the_labels_not_the_mix(session, monkeypatch):
    """With lam = 0.3 each image is mostly its mirror; a model that predicts the labels is right on all."""
    monkeypatch.setattr(Mixup, "_params_per_batch", lambda self: (0.3, False))
    s = session(MIXUP)
    batches = next(s.epoch(0))
    labels = batches[0].labels
    assert not torch.equal(labels, labels.flip(0))
    s.forward = lambda images, boxes, targets: (F.one_hot(labels, CLASSES).float(), s.model(images, boxes, targets)[1])
    assert s.step(batches)["correct"] == len(labels)


def test_cutmix_pastes_a_rectangle_of_the_mirror_batch(session, lams, monkeypatch):
    boxes = []
    box_and_lam = mixup.cutmix_bbox_and_lam
    monkeypatch.setattr(mixup, "cutmix_bbox_and_lam", lambda *a, **k: boxes.append(box_and_lam(*a, **k)) or boxes[-1])
    s = session(CUTMIX)
    seen = watch(s)
    batches = next(s.epoch(0))
    s.step(batches)
    (images, targets, _), = seen
    ((y1, y2, x1, x2), lam), = boxes
    x, labels = batches[0].images.float(), batches[0].labels
    expected = x.clone()
    expected[..., y1:y2, x1:x2] = x.flip(0)[..., y1:y2, x1:x2]
    assert (y2 - y1) * (x2 - x1) > 0 and lams == [lam] and lam == 1 - (y2 - y1) * (x2 - x1) / x[0, 0].numel()
    assert torch.equal(images, expected) and not torch.equal(images, x)
    assert torch.allclose(targets, mixup_target(labels, CLASSES, lam))


def test_no_mixing_when_it_never_happens(session):
    """mix_prob=0 (or both alphas 0): no Mixup; the forward gets the loader's uint8 images and labels."""
    s = session(MIXUP, CUTMIX, "data.augment.mix_prob=0")
    seen = watch(s)
    batches = next(s.epoch(0))
    s.step(batches)
    (images, targets, _), = seen
    assert s.mixup is None and images.dtype == torch.uint8 and torch.equal(images, batches[0].images)
    assert targets.dtype == torch.long and torch.equal(targets, batches[0].labels)


MIXED = {  # what trains on mixed images: each model part, and each method but CAL
    "selector=glsim texture=gabor": ["selector=glsim", "texture=gabor", "texture.region_size=16"],
    "head=aggregator, crops from the original": ["selector=glsim", "head=aggregator",
                                                 "selector.crop_source=original"],
    "CNN": ["backbone=resnet_micro"],
    "method=transfg": ["method=transfg"],
    "method=ffvt": ["method=ffvt"],
    "method=ielt": ["method=ielt", "method.update_warm=0"],
}


@pytest.mark.parametrize("case", MIXED)
def test_each_model_and_method_steps_on_mixed_images(session, case):
    s = session(MIXUP, CUTMIX, "trainer.label_smoothing=0.1", *MIXED[case])
    seen = watch(s)
    steps = s.epoch(0)
    totals = [s.step(next(steps)) for _ in range(2)]
    assert all(images.dtype == torch.float32 and targets.shape == (4, CLASSES) for images, targets, _ in seen)
    assert all(torch.isfinite(v).all() for t in totals for v in t.values())
    terms = [k for k in totals[0] if k.startswith("loss_")]
    if terms:  # a method's terms add up to the loss
        assert sum(totals[0][k] for k in terms) == pytest.approx(totals[0]["loss"].item(), rel=1e-5)


def test_transfg_contrastive_loss_on_a_mix_is_its_expectation_over_labels_drawn_from_it():
    """A pair of mixed images is the same class with the probability that labels drawn from their
    mixes are: the soft term is the mean of the hard term over all such draws, and the hard term for
    one-hot rows."""
    torch.manual_seed(0)
    features, labels, lam = torch.randn(4, 8), torch.tensor([0, 2, 1, 2]), 0.3
    assert contrastive_loss(features, F.one_hot(labels, 3).float()) == contrastive_loss(features, labels)
    soft = mixup_target(labels, 3, lam)  # image i: lam of its class, 1 - lam of image 3 - i's
    expected = 0
    for own in itertools.product([True, False], repeat=4):  # each image's drawn label: its own, or its mirror's
        drawn = torch.where(torch.tensor(own), labels, labels.flip(0))
        expected += torch.prod(torch.tensor([lam if o else 1 - lam for o in own])) * contrastive_loss(features, drawn)
    assert contrastive_loss(features, soft) == pytest.approx(expected.item(), rel=1e-5)


def test_what_cannot_mix_is_refused_in_one_line(compose, session):
    with pytest.raises(ConfigError, match=r"^method=cal cannot train on mixed images: its feature-centre loss .*; "
                                          r"set data.augment.mixup=0 data.augment.cutmix=0$") as refused:
        build_model(compose(*BASE, "method=cal", "backbone=resnet_micro", CUTMIX), CLASSES)
    assert "\n" not in str(refused.value)
    build_model(compose(*BASE, "method=cal", "backbone=resnet_micro", CUTMIX, "data.augment.mix_prob=0"), CLASSES)
    with pytest.raises(ConfigError, match=r"^data.augment.mixup/cutmix mix each image with another of its batch, "
                                          r"which needs an even batch; data.batch_size=5: make it even$"):
        session(MIXUP, "data.batch_size=5")


# --- The linear probe ---------------------------------------------------------------------------------------------

FROZEN = {  # the backbone, and what trains: the head, and what the selector or method owns
    "CNN": (["backbone=resnet_micro"], ["head.fc.weight"]),
    "ViT selector=glsim, its crop CLS token": (["selector=glsim", "backbone.drop_path_rate=0.1"],
                                               ["head.fc.weight", "crop_cls"]),
    "ViT grad_checkpointing": (["selector=glsim", "trainer.grad_checkpointing=true"], ["head.fc.weight", "crop_cls"]),
    "method=transfg": (["method=transfg"], ["method.head.weight"]),
    "method=ielt, its refinement block": (["method=ielt", "method.update_warm=0"],
                                          ["method.head.weight", "method.refine.mlp.fc2.weight"]),
    "method=cal, its attention maps": (["method=cal", "backbone=resnet_micro"],
                                       ["method.fc.weight", "method.attention.conv.weight"]),
}


@pytest.mark.parametrize("case", FROZEN)
def test_a_frozen_backbone_stays_as_loaded_while_the_rest_trains(session, case):
    """backbone.freeze=true: after steps in train mode the backbone's weights and batch-norm statistics
    are bit-identical, it stayed in eval mode, and the optimiser holds exactly the trainable parameters:
    the head's and what the model or method owns, which change."""
    overrides, trains = FROZEN[case]
    s = session("backbone.freeze=true", *overrides)
    model = s.model.train()
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    params = dict(model.named_parameters())
    before = {name: params[name].detach().clone() for name in trains}
    assert model.training and not any(m.training for m in model.backbone.model.modules())
    steps = s.epoch(0)
    for _ in range(2):
        s.step(next(steps))
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
    assert all(not torch.equal(before[name], params[name]) for name in trains), trains
    trainable = [p for name, p in params.items() if not name.startswith("backbone.")]
    assert all(p.requires_grad for p in trainable)
    held = [p for group in s.optimizer.param_groups for p in group["params"]]
    assert len(held) == len(trainable) and {id(p) for p in held} == {id(p) for p in trainable}
