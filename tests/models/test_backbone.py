import pytest
import torch
from safetensors.torch import save_file

from fgvr.engine.optim import param_groups
from fgvr.models.backbone import Backbone
from fgvr.models.heads import LinearHead
from fgvr.models.model import FGVRModel, Normalize
from fgvr.runtime.errors import ConfigError, FgvrError

MICRO = dict(depth=2, embed_dim=48, num_heads=3, patch_size=8)


def test_vit_and_cnn_pooled_features():
    vit = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=MICRO)
    assert vit.is_transformer and vit.forward_tokens(torch.randn(2, 3, 32, 32)).pooled.shape == (2, 48)
    cnn = Backbone("test_resnet", img_size=32)
    assert not cnn.is_transformer
    assert cnn.forward_tokens(torch.randn(2, 3, 32, 32)).pooled.shape == (2, cnn.num_features)


def test_model_takes_uint8_and_normalises_on_device():
    model = FGVRModel(Backbone("test_resnet"), LinearHead(96, 5))
    logits, extras = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8))
    assert logits.shape == (2, 5) and extras == {}


def test_local_checkpoint_loads_and_resamples_position_embeddings(tmp_path):
    """backbone.checkpoint: weights from a local file, pos-embed resampled to a new img_size."""
    source = Backbone("vit_tiny_patch16_224", img_size=32, kwargs=MICRO)
    path = tmp_path / "weights.safetensors"
    save_file({k.removeprefix("model."): v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = Backbone("vit_tiny_patch16_224", checkpoint=str(path), img_size=64, kwargs=MICRO)
    assert loaded.model.pos_embed.shape == (1, 1 + 64, 48)  # 8x8 patches + CLS, from 4x4
    assert torch.equal(loaded.model.blocks[1].mlp.fc2.weight, source.model.blocks[1].mlp.fc2.weight)
    assert loaded.forward_tokens(torch.randn(1, 3, 64, 64)).pooled.shape == (1, 48)


def test_backbone_errors_are_one_line():
    with pytest.raises(ConfigError, match="backbone.name=not_a_model is not a timm model"):
        Backbone("not_a_model")
    with pytest.raises(ConfigError, match="backbone.checkpoint=/nope.pt: no such file"):
        Backbone("test_resnet", checkpoint="/nope.pt")
    with pytest.raises(ConfigError, match="backbone.kwargs: test_resnet does not take"):
        Backbone("test_resnet", kwargs={"bogus_arg": 1})
    with pytest.raises(FgvrError, match="cannot download pretrained weights .* backbone.checkpoint="):
        Backbone("test_resnet.r160_in1k", pretrained=True)  # HF_HUB_OFFLINE=1 in the tests


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = FGVRModel(Backbone("vit_tiny_patch16_224", img_size=32, kwargs=MICRO), LinearHead(48, 3))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.model.cls_token", "backbone.model.pos_embed", "backbone.model.norm.weight",
            "head.fc.bias"} <= skipped
    assert all(names[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_normalize_is_mean_std_of_the_pixels_and_leaves_its_input_alone():
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    expected = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / \
        torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    assert torch.allclose(norm(images), expected, atol=1e-5)
    floats = images.float()
    assert torch.allclose(norm(floats), expected, atol=1e-5) and torch.equal(floats, images.float())


def test_a_frozen_backbone_takes_no_gradient_stays_in_eval_mode_and_is_left_out_of_the_optimiser():
    """backbone.freeze=true: train() leaves the timm model in eval mode (batch-norm statistics as
    loaded), its parameters take no gradient, and param_groups holds only the head's."""
    model = FGVRModel(Backbone("test_resnet", freeze=True), LinearHead(96, 3)).train()
    backbone = model.backbone.model
    assert not any(p.requires_grad for p in backbone.parameters()) and not any(m.training for m in backbone.modules())
    assert model.training and model.head.training
    stats = backbone.bn1.running_mean.clone()
    _, extras = model(torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), labels=torch.tensor([0, 2]))
    extras["losses"]["ce"].backward()
    assert torch.equal(backbone.bn1.running_mean, stats) and all(p.grad is None for p in backbone.parameters())
    held = [p for group in param_groups(model, 0.05) for p in group["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.head.parameters()} and len(held) == 2
    assert all(p.requires_grad for p in Backbone("test_resnet").parameters())  # not frozen by default
