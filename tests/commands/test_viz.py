"""`fgvr viz`: one figure per image with the heat maps (the method's own, pytorch-grad-cam's), boxes,
their legend, the crop and the prediction."""

import cv2
import numpy as np
import pytest
import torch

from fgvr.commands import viz
from fgvr.commands.viz import (
    BAR,
    CAPTION,
    CYAN,
    GAP,
    GREEN,
    LEGEND_LINE,
    PANEL,
    TITLE_LINE,
    WHITE,
    YELLOW,
    cam_target,
    class_activation_maps,
    fit_text,
    render,
    text_width,
    visualise,
)
from fgvr.runtime.config import VizConfig
from fgvr.runtime.errors import ConfigError
from tests.conftest import fgvr

TITLE = TITLE_LINE + 8  # a one-line title
LEGEND = LEGEND_LINE + 4  # a one-line legend


def width(panels: int) -> int:
    return panels * PANEL + (panels - 1) * GAP


def column(k: int) -> slice:
    """The columns of the k-th panel."""
    return slice(k * (PANEL + GAP), k * (PANEL + GAP) + PANEL)


def has(area: np.ndarray, colour) -> bool:
    return bool((area == colour).all(-1).any())


def test_render_draws_heat_map_boxes_crop_colour_bar_legend_and_title():
    image = np.zeros((32, 32, 3), np.uint8)
    scores = np.zeros((4, 4), np.float32)
    scores[1, 2] = 1.0
    figure = render(image, scores, [16, 8, 24, 16], [0, 0, 8, 8], image, "pred a | label a", True,
                    scores_name="GLSim similarity")
    assert figure.shape == (TITLE + CAPTION + PANEL + BAR + LEGEND, width(2), 3)
    body = figure[TITLE + CAPTION:]
    assert body[PANEL * 12 // 32, PANEL * 20 // 32].argmax() == 0  # the hottest patch is red on JET
    assert body[PANEL * 12 // 32, PANEL * 20 // 32, 0] < 128  # and the image shows through it
    assert (body[PANEL * 8 // 32, PANEL * 20 // 32] == GREEN).all()  # selected box edge, green
    assert (body[0, 3] == WHITE).all()  # ground-truth box edge, white
    bar = figure[TITLE + CAPTION + PANEL:][:BAR]
    ramp = bar[12, 40:PANEL - 40]  # the colour bar under the heat map: JET from blue (low) to red (high)
    assert ramp[0].argmax() == 2 and ramp[-1].argmax() == 0 and (bar[:, PANEL:] == 20).all()  # none under the crop
    assert has(figure[:TITLE, :PANEL], GREEN)  # the title, green: right
    assert (figure[TITLE:TITLE + CAPTION, :PANEL] > 100).any()  # the heat map's caption
    key = figure[-LEGEND:]
    assert has(key, GREEN) and has(key, WHITE) and not has(key, CYAN) and not has(key, YELLOW)  # the boxes drawn
    plain = render(image, None, None, None, None, "pred a | label b", False)
    assert plain.shape == (TITLE + CAPTION + PANEL, PANEL, 3)  # no heat map, no box: no colour bar, no legend


def test_render_puts_the_cam_panel_beside_the_methods_map_with_its_own_colour_bar():
    image = np.full((32, 32, 3), 128, np.uint8)
    scores, cam = np.zeros((4, 4), np.float32), np.zeros((32, 32), np.float32)
    scores[0, 0], cam[24:, 24:] = 1.0, 1.0
    figure = render(image, scores, None, [0, 0, 8, 8], image, "t", True, tokens=[[0, 0, 8, 8]], cam=cam,
                    cam_name="Grad-CAM: a")
    assert figure.shape == (TITLE + CAPTION + PANEL + BAR + LEGEND, width(3), 3)
    panels = figure[TITLE + CAPTION:TITLE + CAPTION + PANEL]
    cam_panel = panels[:, column(1)]
    assert cam_panel[-20, -20].argmax() == 0 and cam_panel[20, 20].argmax() == 2  # hot bottom right, cold elsewhere
    assert panels[20, 20].argmax() == 0  # the method's map, hot top left, stays in the first panel
    assert cam_panel[20, 20, 0] >= 0.58 * 128  # the heat map lets most of the image through
    assert (cam_panel[0, 3] == WHITE).all()  # the ground truth on the CAM too
    bars = figure[TITLE + CAPTION + PANEL:][:BAR]
    cam_bar = bars[12, column(1)]
    assert cam_bar[40].argmax() == 2 and cam_bar[-40].argmax() == 0  # its colour bar
    assert (bars[:, column(2)] == 20).all()  # none under the crop
    assert has(figure[-LEGEND:], CYAN)  # the selected tokens in the legend


def test_render_fits_a_long_title_onto_a_narrow_figure():
    image = np.zeros((32, 32, 3), np.uint8)
    title = "pred 042.Vermilion_Flycatcher_of_the_Southern_Andes (wrong) | label 043.Yellow_bellied_Flycatcher"
    figure = render(image, None, None, None, None, title, False)
    assert figure.shape == (2 * TITLE_LINE + 8 + CAPTION + PANEL, PANEL, 3)  # two lines: pred, label
    rows = figure[:2 * TITLE_LINE + 8]
    assert (rows[:TITLE_LINE + 4].max(-1) > 100).any() and (rows[TITLE_LINE + 4:].max(-1) > 100).any()
    assert (rows[:, -4:] == 20).all()  # nothing drawn past the right margin: the text fits
    text, scale = fit_text("label " + "x" * 80, 200, 0.5)
    assert text_width(text, scale) <= 200 and text.endswith("..") and scale == 0.35
    assert fit_text("label a", 200, 0.5) == ("label a", 0.5)


def test_render_draws_texture_regions_and_the_filter_strip():
    from fgvr.commands.viz import texture_strip

    image = np.zeros((32, 32, 3), np.uint8)
    strip = texture_strip(image, [np.eye(7) - 1 / 7] * 4, [np.random.rand(5, 5)] * 4)
    assert strip.shape == (PANEL, PANEL + 4 * PANEL // 2, 3)
    figure = render(image, None, None, None, None, "t", True, regions=[([0, 16, 16, 32], 0.8), ([16, 0, 32, 16], 0.0)],
                    strip=strip)
    assert figure.shape == (TITLE + CAPTION + PANEL + LEGEND + CAPTION + PANEL, strip.shape[1], 3)
    assert (figure[TITLE + CAPTION + PANEL - 2, 60] == YELLOW).all()  # the first region's bottom edge, yellow
    assert has(figure[TITLE + CAPTION + PANEL:][:LEGEND], YELLOW)  # and in the legend
    assert (figure[-PANEL:] == strip).all()


def test_viz_writes_one_png_per_image_and_a_wandb_table(train_run, tmp_path):
    _, run_dir = train_run("selector=glsim", "head=aggregator", "trainer.epochs=1", "logger=wandb")
    paths = visualise(VizConfig(ckpt=str(run_dir), n=5))
    assert [p.name for p in paths] == [f"test_{k:03d}.png" for k in range(5)]
    assert all(p.parent == run_dir / "viz" for p in paths)
    assert cv2.imread(str(paths[0])).shape[1] == width(2)  # the heat map and the crop
    logs = b"".join(p.read_bytes() for p in (run_dir / "viz" / "wandb").rglob("*.wandb"))
    assert b"viz/test" in logs  # the table went to a new (offline) W&B run beside the figures


def drawn(monkeypatch) -> list[dict]:
    """The arguments of every render() call visualise makes."""
    import inspect

    calls, real = [], viz.render
    monkeypatch.setattr(viz, "render", lambda *a, **kw: calls.append(inspect.signature(real).bind(*a, **kw).arguments)
                        or real(*a, **kw))
    return calls


class Logits(torch.nn.Module):
    """images -> logits of an FGVRModel, as the reference calls to pytorch-grad-cam take it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model(images)[0]


def reference_cam(model, image: np.ndarray, layer, reshape=None) -> np.ndarray:
    """pytorch-grad-cam's GradCAM of the predicted class, called directly on one (H, W, 3) image."""
    from pytorch_grad_cam import GradCAM

    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    return GradCAM(Logits(model), [layer], reshape)(x, None)[0]


def test_cam_of_a_vit_with_a_crop_selector_is_pytorch_grad_cams_on_the_first_pass(train_run, monkeypatch):
    from fgvr.engine.evaluate import load_run

    _, run_dir = train_run("selector=glsim", "trainer.epochs=1")
    calls = drawn(monkeypatch)
    paths = visualise(VizConfig(ckpt=str(run_dir), n=2, cam="gradcam"))
    figure = cv2.imread(str(paths[0]))[..., ::-1]
    assert figure.shape[1] == width(3)  # GLSim's map, the CAM, the crop
    cam_panel = figure[TITLE + CAPTION:TITLE + CAPTION + PANEL, column(1)]
    assert cam_panel.std() > 5
    shown = calls[0]
    cam = shown["cam"]
    assert cam.shape == (32, 32) and cam.std() > 0 and shown["cam_name"].startswith("Grad-CAM: ")
    assert shown["scores_name"] == "GLSim similarity"

    model = load_run(str(run_dir), "cpu").model
    patches = model.backbone.model.blocks[-1].norm1
    grid = model.backbone.model.patch_embed.grid_size
    # The reference: the crop pass without gradient, so the only gradient the library records is the first pass's.
    second_pass = model.second_pass
    monkeypatch.setattr(model, "second_pass", lambda *a: torch.no_grad()(second_pass)(*a))
    expected = reference_cam(model, shown["image"], patches, lambda t: t[:, 1:].unflatten(1, grid).permute(0, 3, 1, 2))
    np.testing.assert_allclose(cam, expected, atol=1e-4)

    images = torch.stack([torch.from_numpy(c["image"]).permute(2, 0, 1).float() for c in calls])
    preds = model(images)[0].argmax(-1).tolist()
    maps = {kind: class_activation_maps(model, images, kind, preds) for kind in ("gradcam", "gradcam++", "finercam")}
    np.testing.assert_allclose(maps["gradcam"][0], cam, atol=1e-4)  # a batch at once, as one image alone
    for kind in ("gradcam++", "finercam"):
        assert maps[kind].shape == (2, 32, 32) and maps[kind].std() > 0
        assert np.abs(maps[kind] - maps["gradcam"]).max() > 0.05, kind


def test_cam_of_a_cnn_is_pytorch_grad_cams_on_its_last_feature_map_frozen_or_not(train_run, monkeypatch):
    from fgvr.engine.evaluate import load_run

    _, run_dir = train_run("backbone=resnet_micro", "trainer.epochs=1")
    calls = drawn(monkeypatch)
    (path,) = visualise(VizConfig(ckpt=str(run_dir), n=1, cam="gradcam"))
    assert cv2.imread(str(path)).shape[1] == width(2)  # the image, the CAM
    cam, image = calls[0]["cam"], calls[0]["image"]
    assert cam.std() > 0

    model = load_run(str(run_dir), "cpu").model
    net = model.backbone.model
    assert cam_target(net, (32, 32)) == (net.layer4, None)  # timm's last feature_info module
    np.testing.assert_allclose(cam, reference_cam(model, image, net.layer4), atol=1e-4)
    model.requires_grad_(False)  # a frozen backbone (backbone.freeze): the CAM still has its gradient
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    pred = int(model(x)[0].argmax())
    np.testing.assert_allclose(class_activation_maps(model, x, "gradcam", [pred])[0], cam, atol=1e-4)


@pytest.mark.parametrize("overrides", [["method=transfg"], ["method=cal", "backbone=resnet_micro"],
                                       ["selector=glsim", "selector.crop_size=16"]])
def test_cam_runs_where_the_backbone_sees_other_tokens_or_runs_twice(compose, overrides):
    """TransFG's last block sees its selected tokens only (the CAM is on the block before); CAL and a
    selector whose crops are smaller run the backbone again on another grid (the CAM is of the first pass)."""
    from fgvr.models.model import build_model

    torch.manual_seed(0)
    model = build_model(compose("backbone=vit_micro", "data.img_size=32", *overrides), 4).eval()
    images = torch.rand(2, 3, 32, 32) * 255
    maps = class_activation_maps(model, images, "gradcam", [0, 1])
    assert maps.shape == (2, 32, 32) and maps.std() > 0


def test_cam_reshape_drops_register_tokens_on_a_non_square_grid():
    import timm
    from pytorch_grad_cam import GradCAM

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", img_size=(32, 48), patch_size=8, depth=2, embed_dim=32,
                            num_heads=2, reg_tokens=2, num_classes=5).eval()
    layer, reshape = cam_target(net, (32, 48))
    assert layer is net.blocks[-1].norm1 and net.num_prefix_tokens == 3  # CLS and 2 registers
    assert reshape(torch.zeros(2, 3 + 4 * 6, 32)).shape == (2, 32, 4, 6)
    maps = GradCAM(net, [layer], reshape)(torch.randn(2, 3, 32, 48), None)
    assert maps.shape == (2, 32, 48) and maps.std() > 0


def test_viz_rejects_an_unknown_cam_in_one_line():
    with pytest.raises(ConfigError) as error:
        visualise(VizConfig(ckpt="/nope", cam="scorecam"))
    assert str(error.value) == "cam=scorecam: choose one of none, gradcam, gradcam++, finercam"


@pytest.mark.slow  # five `fgvr viz` subprocesses (~55 s); visualise() itself is tested in-process above
def test_viz_command_and_its_errors(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")  # no selector: the images and predictions only
    out = tmp_path / "figs"
    fgvr("viz", f"ckpt={run_dir}", "n=2", "split=val", f"out={out}", cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["val_000.png", "val_001.png", "viz.json"]
    assert cv2.imread(str(out / "val_000.png")).shape[1] == PANEL
    for args, message in [([f"ckpt={run_dir}", "n=0"], "n=0: must be >= 1"),
                          ([f"ckpt={run_dir}", "split=train"], "split=train: choose test or val"),
                          ([f"ckpt={run_dir}", "cam=cam"], "cam=cam: choose one of none, gradcam, gradcam++, finercam"),
                          (["ckpt=/nope"], "ckpt=/nope: no such file or run dir")]:
        proc = fgvr("viz", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"fgvr viz: error: {message}", proc.stderr


def test_viz_of_a_texture_run_shows_regions_and_filters(train_run):
    _, run_dir = train_run("texture=gabor", "texture.region_size=16", "texture.kernel_size=7", "trainer.epochs=1")
    (path,) = visualise(VizConfig(ckpt=str(run_dir), n=1))
    figure = cv2.imread(str(path))[..., ::-1]
    assert figure.shape[1] == PANEL + 4 * PANEL // 2
    top = figure.shape[0] - PANEL - CAPTION - LEGEND - PANEL
    assert has(figure[top:top + PANEL, :PANEL], YELLOW)  # regions drawn
    assert figure[-PANEL:, PANEL:].std() > 0  # kernels and responses drawn
