"""eval.tta=flip: the mean of the logits of the images and of their mirror images, in training's
val/test evaluation, `fgvr eval` and `fgvr predict`; recorded in results.json and kept apart by
`fgvr table`."""

import json

import pytest
import torch
from torch import nn

from fgvr.commands.eval import evaluate_checkpoint
from fgvr.commands.table import build_table, read_run_dir
from fgvr.engine.evaluate import forward_tta
from fgvr.runtime.config import EvalConfig, Tta
from tests.commands.test_table import write_run


class Recorder(nn.Module):
    """Logits that depend on where the image's mass is (so a mirror image changes them); records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, images, truth=None):
        self.calls.append((images.clone(), None if truth is None else truth.clone()))
        columns = images.float().mean((1, 2))  # (B, W)
        return torch.stack([columns[:, 0], columns[:, -1]], -1), {"boxes": torch.zeros(len(images), 4)}


def test_flip_averages_the_logits_of_the_images_and_their_mirror_images():
    model = Recorder()
    images = torch.zeros(2, 3, 4, 6, dtype=torch.uint8)
    images[..., 0] = 200  # bright on the left
    truth = torch.tensor([[0.1, 0.2, 0.4, 0.9], [0.5, 0.0, 1.0, 0.5]])
    plain, _ = forward_tta(model, images, truth, Tta.none)
    assert len(model.calls) == 1 and plain[:, 0].gt(plain[:, 1]).all()
    flipped, extras = forward_tta(model, images, truth, "flip")
    (seen, seen_truth), (mirror, mirror_truth) = model.calls[1:]
    assert torch.equal(mirror, images.flip(-1)) and torch.equal(seen, images)
    # the oracle's ground-truth box is mirrored with the image
    assert torch.allclose(mirror_truth, torch.tensor([[0.6, 0.2, 0.9, 0.9], [0.0, 0.0, 0.5, 0.5]]))
    assert torch.allclose(flipped, torch.full_like(plain, 100.0))  # (200 + 0) / 2 in both columns
    assert "boxes" in extras  # the extras are the unmirrored pass's
    forward_tta(model, images, None, Tta.flip)  # no boxes: none mirrored
    assert model.calls[-1][1] is None


def test_a_run_evaluates_with_its_tta_and_records_it(train_run):
    results, run_dir = train_run("trainer.epochs=1", "eval.tta=flip")
    assert results["tta"] == "flip"
    again = evaluate_checkpoint(EvalConfig(ckpt=str(run_dir), out=str(run_dir / "again.json")))
    assert again["tta"] == "flip" and again["loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    plain = evaluate_checkpoint(EvalConfig(ckpt=str(run_dir), tta=Tta.none, out=str(run_dir / "plain.json")))
    assert plain["tta"] == "none" and plain["loss"] != pytest.approx(results["test_loss"], rel=1e-5)
    assert json.loads((run_dir / "plain.json").read_text())["tta"] == "none"


def test_table_keeps_runs_with_another_tta_apart(tmp_path):
    runs = [write_run(tmp_path / "a", seed=1, acc=90.0, tta="none"),
            write_run(tmp_path / "b", seed=2, acc=90.4),  # before tta was recorded: none
            write_run(tmp_path / "c", seed=1, acc=91.0, tta="flip"),
            # re-evaluated with resume=evaluate eval.tta=flip: its config still says none, results.json flip
            write_run(tmp_path / "d", seed=2, acc=91.4, tta="flip", config={"eval.tta": "none"})]
    table = build_table([read_run_dir(r) for r in runs], rows=["selector"], cols=["dataset"])
    assert table.varied == ["eval.tta"]
    cells = {row: table.cells[(row, ("cub",))] for row in table.rows}
    assert {row[-1]: (round(cell.mean, 6), cell.n) for row, cell in cells.items()} == {"none": (90.2, 2), "flip": (91.2, 2)}
