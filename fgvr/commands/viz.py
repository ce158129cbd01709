"""`fgvr viz ckpt=<run dir or .pt> n=16`: what the selector, the texture branch or the method
looked at, one PNG per image.

Each PNG shows the image with the patch-score heat map, the selected box (green) and the
ground-truth box (white, where the data has one), the crop the second pass saw, and the
prediction against the label. A token-selecting method (TransFG, FFVT, IELT) shows its selected
patches (cyan) and the box around them; CAL its attention maps' mean as the heat map and its
crop. With the texture branch it also shows its regions (yellow, the
gate's weight beside each; thin where the weight is 0) and a strip with the best region and the
four filters that respond most to it: each kernel (real part) above its response. With
logger=wandb in the run, the same panels go as a table to a new W&B run in the run's group."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from fgvr.commands.eval import output_path
from fgvr.engine.evaluate import check_split, checkpoint_path, load_run, split_loader
from fgvr.runtime.config import VizConfig, check_values
from fgvr.runtime.errors import FgvrError
from fgvr.runtime.tracker import start_logger, write_json

log = logging.getLogger(__name__)

PANEL = 224  # display size of each panel, px
GREEN, WHITE, RED, YELLOW, CYAN = (40, 220, 40), (255, 255, 255), (230, 40, 40), (250, 220, 30), (40, 220, 230)
SHOWN_FILTERS = 4
INDEX = "viz.json"  # the figures fgvr viz wrote into a folder, by split: all that a later viz may replace


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float or uint8 tensor -> (H, W, 3) uint8 RGB array."""
    return image.clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _panel(image: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (PANEL, PANEL), interpolation=cv2.INTER_NEAREST if image.shape[0] < 64 else cv2.INTER_AREA)


def _box(image: np.ndarray, box, size: int, colour, thickness: int = 2) -> None:
    x1, y1, x2, y2 = (int(round(v * PANEL / size)) for v in box)
    cv2.rectangle(image, (x1, y1), (max(x2 - 1, x1), max(y2 - 1, y1)), colour, thickness)


def _gray(values: np.ndarray, side: int, signed: bool = False) -> np.ndarray:
    """A 2-d float map -> (side, side, 3) uint8, min-max scaled (symmetric about 0 if signed)."""
    if signed:
        v = 0.5 + 0.5 * values / max(float(np.abs(values).max()), 1e-8)
    else:
        v = (values - values.min()) / max(float(values.max() - values.min()), 1e-8)
    img = cv2.resize((255 * v).astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST)
    return np.repeat(img[..., None], 3, axis=-1)


def texture_strip(region: np.ndarray, kernels: list[np.ndarray], responses: list[np.ndarray]) -> np.ndarray:
    """[the region | per filter: its kernel above its response], RGB uint8, PANEL high."""
    half = PANEL // 2
    cols = [np.concatenate([_gray(k, half, signed=True), _gray(r, half)], axis=0) for k, r in zip(kernels, responses)]
    return np.concatenate([_panel(region), *cols], axis=1)


def render(image: np.ndarray, scores: np.ndarray | None, box, truth, crop_img: np.ndarray | None,
           title: str, correct: bool, regions: list | None = None, strip: np.ndarray | None = None,
           tokens: list | None = None) -> np.ndarray:
    """One figure: [image + heat map + boxes | crop] under a title line, and below it the texture
    strip if given; `regions` are (box, weight) pairs, `tokens` the boxes of selected patches. RGB uint8."""
    size = image.shape[0]
    left = _panel(image)
    if scores is not None:
        s = (scores - scores.min()) / max(float(scores.max() - scores.min()), 1e-8)
        heat = cv2.resize((255 * s).astype(np.uint8), (PANEL, PANEL), interpolation=cv2.INTER_NEAREST)
        heat = cv2.applyColorMap(heat, cv2.COLORMAP_JET)[..., ::-1]
        left = cv2.addWeighted(left, 0.55, heat, 0.45, 0)
    for token in tokens or []:
        _box(left, token, size, CYAN, 1)
    if truth is not None:
        _box(left, truth, size, WHITE)
    for region, weight in regions or []:
        _box(left, region, size, YELLOW, 2 if weight > 0 else 1)
        x, y = (int(round(v * PANEL / size)) for v in region[:2])
        cv2.putText(left, f"{weight:.2f}", (x + 3, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, YELLOW, 1, cv2.LINE_AA)
    if box is not None:
        _box(left, box, size, GREEN)
    panels = [left] + ([_panel(crop_img)] if crop_img is not None else [])
    body = np.concatenate(panels, axis=1)
    if strip is not None:
        width = max(body.shape[1], strip.shape[1])
        pad = lambda a: np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)))  # noqa: E731
        body = np.concatenate([pad(body), pad(strip)], axis=0)
    bar = np.full((28, body.shape[1], 3), 20, np.uint8)
    cv2.putText(bar, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, GREEN if correct else RED, 1, cv2.LINE_AA)
    return np.concatenate([bar, body], axis=0)


@torch.no_grad()
def visualise(cfg: VizConfig) -> list[Path]:
    """Write the figures for the first cfg.n images of the split; returns their paths."""
    check_values(cfg, VizConfig)
    check_split(cfg.split)
    out_dir = output_path(checkpoint_path(cfg.ckpt), cfg.out, lambda run: run.viz, _is_viz_dir)
    run = load_run(cfg.ckpt, cfg.device, cfg.data_root, skip_bad=cfg.skip_bad)
    model, classes = run.model, run.state["classes"]
    index = _read_index(out_dir)
    earlier = index.get(cfg.split, [])
    if earlier:
        log.warning("replacing the %d %s figures already in %s", len(earlier), cfg.split, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    with run.loaders:  # their workers end here, not at exit
        for batch in split_loader(run, cfg.split):
            images = batch.images.to(run.device).float()
            logits, extras = model(images, batch.boxes.to(run.device))
            shown = model.to_input(images)  # what the first pass saw, at the input size
            preds = logits.argmax(-1).cpu().tolist()
            boxes, scores, tokens = extras.get("boxes"), extras.get("scores"), extras.get("token_boxes")
            if "maps" in extras:  # CAL: where its attention maps look, on average
                scores = extras["maps"].float().mean(1)
            cropped = boxes is not None and tokens is None  # a token method's box is no crop it saw
            crops = model.crops(model.selector_source(images, shown), boxes).cpu() if cropped else None
            tokens = tokens.cpu().tolist() if tokens is not None else None
            shown = shown.cpu()
            boxes = boxes.cpu().tolist() if boxes is not None else None
            scores = scores.float().cpu().numpy() if scores is not None else None
            truths = batch.boxes * model.input_size
            regions, strips = _texture(model, images, extras) if model.texture is not None else (None, None)
            for i in range(min(len(images), cfg.n - len(paths))):
                pred, label = preds[i], int(batch.labels[i])
                truth = truths[i].tolist() if truths[i].isfinite().all() else None
                figure = render(_to_uint8(shown[i]), scores[i] if scores is not None else None,
                                boxes[i] if boxes is not None else None, truth,
                                _to_uint8(crops[i]) if crops is not None else None,
                                f"pred {classes[pred]} | label {classes[label]}", pred == label,
                                regions[i] if regions is not None else None, strips[i] if strips is not None else None,
                                tokens[i] if tokens is not None else None)
                path = out_dir / f"{cfg.split}_{len(paths):03d}.png"
                if not cv2.imwrite(str(path), figure[..., ::-1]):
                    raise FgvrError(f"{path}: cannot write the figure (a full disk, or no permission)")
                paths.append(path)
                rows.append((path, classes[pred], classes[label], pred == label))
            if len(paths) >= cfg.n:
                break
    for stale in set(earlier) - {p.name for p in paths}:  # an earlier viz's figures beyond this n
        (out_dir / stale).unlink(missing_ok=True)
    write_json(out_dir / INDEX, index | {cfg.split: [p.name for p in paths]})
    log.info("wrote %d figures to %s", len(paths), out_dir)
    if run.cfg.logger.get("_target_"):  # logger=wandb
        _to_wandb(run, rows, cfg.split, out_dir)
    return paths


def _is_viz_dir(path: Path) -> bool:
    """A folder fgvr viz may write into: an empty one, or one it wrote before (it holds the index)."""
    return path.is_dir() and (not any(path.iterdir()) or (path / INDEX).is_file())


def _read_index(out_dir: Path) -> dict[str, list[str]]:
    """The figures an earlier fgvr viz wrote into `out_dir`, by split."""
    try:
        return json.loads((out_dir / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def _texture(model, images: torch.Tensor, extras: dict) -> tuple[list, list]:
    """Per image: its texture regions as (box, weight) pairs, and the strip of its best region
    with the SHOWN_FILTERS filters that respond most to it."""
    region = model.texture_crops(images, extras["regions"][:, :1])[:, 0]  # the best region, (B, C, S, S)
    bank = model.texture.encoder.bank
    maps = bank(region)  # (B, C * N, h, w)
    top = maps.mean((-2, -1)).topk(min(SHOWN_FILTERS, maps.shape[1]), dim=-1).indices
    kernels = bank.kernels()[:bank.num_filters, 0].cpu().numpy()  # real parts
    maps, region, top = maps.cpu().numpy(), (region.mean(1) * 255).cpu().numpy(), top.cpu().tolist()
    boxes, weights = extras["regions"].cpu().tolist(), extras["region_weights"].float().cpu().tolist()
    regions = [list(zip(b, w)) for b, w in zip(boxes, weights)]
    strips = [texture_strip(np.repeat(region[i, ..., None].clip(0, 255).astype(np.uint8), 3, axis=-1),
                            [kernels[j % bank.num_filters] for j in top[i]], [maps[i, j] for j in top[i]])
              for i in range(len(boxes))]
    return regions, strips


def _to_wandb(run, rows: list, split: str, out_dir: Path) -> None:
    """The figures as a table in a new W&B run (job_type viz, its files in `out_dir`) in the group of
    the run's own W&B run: its sweep, else the run itself. That run stays as it ended."""
    import wandb

    original = run.state.get("wandb_id")
    name = run.state.get("run_name") or original or run.path.parent.parent.name  # older checkpoints: the id
    wb = start_logger(run.cfg.logger, out_dir, None, name=f"{name}-viz", group=run.state.get("run_group") or original,
                      job_type="viz")
    table = wandb.Table(columns=["figure", "prediction", "label", "correct"])
    for path, pred, label, correct in rows:
        table.add_data(wandb.Image(str(path)), pred, label, correct)
    wb.log({f"viz/{split}": table})
    wb.finish()
