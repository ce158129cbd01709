"""`fgvr viz`: one figure per image with the heat map, boxes, crop and prediction."""

import cv2
import pytest

from fgvr.commands.viz import PANEL, render, visualise
from fgvr.runtime.config import VizConfig
from tests.conftest import fgvr


def test_render_draws_heat_map_boxes_crop_and_title():
    import numpy as np

    image = np.zeros((32, 32, 3), np.uint8)
    scores = np.zeros((4, 4), np.float32)
    scores[1, 2] = 1.0
    figure = render(image, scores, [16, 8, 24, 16], [0, 0, 8, 8], image, "pred a | label a", True)
    assert figure.shape == (28 + PANEL, 2 * PANEL, 3)
    body = figure[28:]
    assert body[PANEL * 12 // 32, PANEL * 20 // 32].argmax() == 0  # the hottest patch is red on JET
    assert (body[PANEL * 8 // 32, PANEL * 20 // 32] == (40, 220, 40)).all()  # selected box edge, green
    assert (body[0, 3] == 255).all()  # ground-truth box edge, white
    plain = render(image, None, None, None, None, "pred a | label b", False)
    assert plain.shape == (28 + PANEL, PANEL, 3)


def test_viz_writes_one_png_per_image_and_a_wandb_table(train_run, tmp_path):
    _, run_dir = train_run("selector=glsim", "head=aggregator", "trainer.epochs=1", "logger=wandb")
    paths = visualise(VizConfig(ckpt=str(run_dir), n=5))
    assert [p.name for p in paths] == [f"test_{k:03d}.png" for k in range(5)]
    assert all(p.parent == run_dir / "viz" for p in paths)
    assert cv2.imread(str(paths[0])).shape == (28 + PANEL, 2 * PANEL, 3)
    logs = b"".join(p.read_bytes() for p in (run_dir / "viz" / "wandb").rglob("*.wandb"))
    assert b"viz/test" in logs  # the table went to a new (offline) W&B run beside the figures


@pytest.mark.slow  # four `fgvr viz` subprocesses (~45 s); visualise() itself is tested in-process above
def test_viz_command_and_its_errors(train_run, tmp_path):
    _, run_dir = train_run("trainer.epochs=1")  # no selector: the images and predictions only
    out = tmp_path / "figs"
    fgvr("viz", f"ckpt={run_dir}", "n=2", "split=val", f"out={out}", cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["val_000.png", "val_001.png", "viz.json"]
    assert cv2.imread(str(out / "val_000.png")).shape == (28 + PANEL, PANEL, 3)
    for args, message in [([f"ckpt={run_dir}", "n=0"], "n=0: must be >= 1"),
                          ([f"ckpt={run_dir}", "split=train"], "split=train: choose test or val"),
                          (["ckpt=/nope"], "ckpt=/nope: no such file or run dir")]:
        proc = fgvr("viz", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip() == f"fgvr viz: error: {message}", proc.stderr


def test_render_draws_texture_regions_and_the_filter_strip():
    import numpy as np

    from fgvr.commands.viz import texture_strip

    image = np.zeros((32, 32, 3), np.uint8)
    strip = texture_strip(image, [np.eye(7) - 1 / 7] * 4, [np.random.rand(5, 5)] * 4)
    assert strip.shape == (PANEL, PANEL + 4 * PANEL // 2, 3)
    figure = render(image, None, None, None, None, "t", True, regions=[([0, 16, 16, 32], 0.8), ([16, 0, 32, 16], 0.0)],
                    strip=strip)
    assert figure.shape == (28 + 2 * PANEL, strip.shape[1], 3)
    assert (figure[28 + PANEL - 2, 60] == (250, 220, 30)).all()  # the first region's bottom edge, yellow


def test_viz_of_a_texture_run_shows_regions_and_filters(train_run):
    _, run_dir = train_run("texture=gabor", "texture.region_size=16", "texture.kernel_size=7", "trainer.epochs=1")
    (path,) = visualise(VizConfig(ckpt=str(run_dir), n=1))
    figure = cv2.imread(str(path))[..., ::-1]
    assert figure.shape == (28 + 2 * PANEL, PANEL + 4 * PANEL // 2, 3)
    assert ((figure[28:28 + PANEL, :PANEL] == (250, 220, 30)).all(-1)).any()  # regions drawn
    assert figure[28 + PANEL:, PANEL:].std() > 0  # kernels and responses drawn
