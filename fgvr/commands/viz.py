"""`fgvr viz ckpt=<run dir or .pt> n=16`: what the selector, the texture branch or the method
looked at, one PNG per image.

Each PNG shows, under the prediction and the label (green if right, red if wrong), the image with
the method's own heat map (GLSim similarity, attention rollout, CAL's attention maps) and its
boxes: the selected box (green), the ground-truth box (white, where the data has one), a token
method's (TransFG, FFVT, IELT) selected patches (cyan), the texture branch's regions (yellow, the
gate's weight beside each; thin where the weight is 0). Beside it, with `cam=gradcam|gradcam++|finercam`,
pytorch-grad-cam's class activation map of the predicted class; then the crop the second pass saw.
Each heat map has its colour bar, and a legend names the boxes drawn. With the texture branch a
strip below shows the best region and the four filters that respond most to it: each kernel (real
part) above its response. With logger=wandb in the run, the same figures go as a table to a new
W&B run in the run's group."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch import nn

from fgvr.commands.eval import output_path
from fgvr.engine.evaluate import check_split, checkpoint_path, load_run, split_loader
from fgvr.models.methods.vit import patch_layout
from fgvr.models.model import FGVRModel
from fgvr.runtime.config import VizConfig, check_values
from fgvr.runtime.errors import ConfigError, FgvrError
from fgvr.runtime.tracker import start_logger, write_json

log = logging.getLogger(__name__)

PANEL = 224  # display size of each panel, px
GREEN, WHITE, RED, YELLOW, CYAN = (40, 220, 40), (255, 255, 255), (230, 40, 40), (250, 220, 30), (40, 220, 230)
BACKGROUND, TEXT = 20, (210, 210, 210)
FONT, MARGIN, GAP = cv2.FONT_HERSHEY_SIMPLEX, 6, 4  # GAP: between panels, px
TITLE_SCALE, TITLE_LINE = 0.5, 20  # the title's font scale and line height, px
CAPTION, BAR, LEGEND_LINE = 20, 24, 20  # heights of a panel's caption, a colour bar and a legend line, px
HEAT_ALPHA = 0.4  # the heat map's weight over the image
SHOWN_FILTERS = 4
INDEX = "viz.json"  # the figures fgvr viz wrote into a folder, by split: all that a later viz may replace
CAMS = {"gradcam": ("GradCAM", "Grad-CAM"), "gradcam++": ("GradCAMPlusPlus", "Grad-CAM++"),
        "finercam": ("FinerCAM", "Finer-CAM")}  # cam= -> (pytorch_grad_cam class, name in the figure)
SCORE_NAMES = {"glsim": "GLSim similarity", "rollout": "attention rollout", "random": "random scores",
               "cal": "CAL attention (mean map)"}


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


def _heat(panel: np.ndarray, values: np.ndarray, interpolation: int) -> np.ndarray:
    """The panel under a min-max scaled map (JET), HEAT_ALPHA opaque."""
    v = (values - values.min()) / max(float(values.max() - values.min()), 1e-8)
    v = cv2.resize(v.astype(np.float32), (PANEL, PANEL), interpolation=interpolation)
    heat = cv2.applyColorMap((255 * v.clip(0, 1)).round().astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(panel, 1 - HEAT_ALPHA, heat, HEAT_ALPHA, 0)


def text_width(text: str, scale: float) -> int:
    return cv2.getTextSize(text, FONT, scale, 1)[0][0]


def fit_text(text: str, width: int, scale: float, smallest: float = 0.35) -> tuple[str, float]:
    """(text, font scale) that fit `width` px: the scale lowered towards `smallest`, then the text
    cut short with '..'."""
    while text_width(text, scale) > width and scale > smallest:
        scale = max(smallest, round(scale - 0.05, 2))
    cut = text
    while text_width(text, scale) > width and cut:
        cut = cut[:-1]
        text = cut.rstrip() + ".."
    return text, scale


def _strip(height: int, width: int) -> np.ndarray:
    return np.full((height, width, 3), BACKGROUND, np.uint8)


def _caption(text: str, width: int, colour=TEXT, scale: float = 0.45) -> np.ndarray:
    row = _strip(CAPTION, width)
    text, scale = fit_text(text, width - 2 * MARGIN, scale)
    cv2.putText(row, text, (MARGIN, 14), FONT, scale, colour, 1, cv2.LINE_AA)
    return row


def colour_bar(width: int) -> np.ndarray:
    """'low [JET ramp] high': how the heat maps' colours read (each map min-max scaled)."""
    row = _strip(BAR, width)
    scale = 0.4
    left = MARGIN + text_width("low", scale) + 4
    right = width - MARGIN - text_width("high", scale) - 4
    ramp = np.linspace(0, 255, right - left).round().astype(np.uint8)[None].repeat(10, axis=0)
    row[7:17, left:right] = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)[..., ::-1]
    cv2.putText(row, "low", (MARGIN, 16), FONT, scale, TEXT, 1, cv2.LINE_AA)
    cv2.putText(row, "high", (right + 4, 16), FONT, scale, TEXT, 1, cv2.LINE_AA)
    return row


def legend(entries: list[tuple[str, tuple[int, int, int]]], width: int) -> np.ndarray:
    """What each box colour means: a swatch and its name per entry, wrapped onto as many lines as `width` needs."""
    scale, swatch = 0.4, 14
    lines, line, x = [], [], MARGIN
    for name, colour in entries:
        name = fit_text(name, width - 2 * MARGIN - swatch - 4, scale, smallest=scale)[0]
        step = swatch + 4 + text_width(name, scale) + 12
        if line and x + step - 12 > width - MARGIN:
            lines.append(line)
            line, x = [], MARGIN
        line.append((x, name, colour))
        x += step
    lines.append(line)
    rows = _strip(LEGEND_LINE * len(lines) + 4, width)
    for k, line in enumerate(lines):
        y = 4 + k * LEGEND_LINE
        for x, name, colour in line:
            cv2.rectangle(rows, (x, y + 3), (x + swatch - 1, y + 13), colour, 2)
            cv2.putText(rows, name, (x + swatch + 4, y + 13), FONT, scale, TEXT, 1, cv2.LINE_AA)
    return rows


def title_rows(title: str, width: int, colour) -> np.ndarray:
    """The title on one line, or on a line per ' | '-separated part where it does not fit `width`;
    each line shrunk (or cut) to fit."""
    lines = [title] if text_width(title, TITLE_SCALE) <= width - 2 * MARGIN else title.split(" | ")
    rows = _strip(TITLE_LINE * len(lines) + 8, width)
    for k, line in enumerate(lines):
        text, scale = fit_text(line, width - 2 * MARGIN, TITLE_SCALE)
        cv2.putText(rows, text, (MARGIN, 19 + k * TITLE_LINE), FONT, scale, colour, 1, cv2.LINE_AA)
    return rows


def texture_strip(region: np.ndarray, kernels: list[np.ndarray], responses: list[np.ndarray]) -> np.ndarray:
    """[the region | per filter: its kernel above its response], RGB uint8, PANEL high."""
    half = PANEL // 2
    cols = [np.concatenate([_gray(k, half, signed=True), _gray(r, half)], axis=0) for k, r in zip(kernels, responses)]
    return np.concatenate([_panel(region), *cols], axis=1)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of any widths, one under another, padded on the right to the widest."""
    width = max(r.shape[1] for r in rows)
    return np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=BACKGROUND)
                           for r in rows], axis=0)


def render(image: np.ndarray, scores: np.ndarray | None, box, truth, crop_img: np.ndarray | None,
           title: str, correct: bool, regions: list | None = None, strip: np.ndarray | None = None,
           tokens: list | None = None, *, cam: np.ndarray | None = None, scores_name: str = "patch scores",
           cam_name: str = "Grad-CAM", box_name: str = "crop box") -> np.ndarray:
    """One figure, RGB uint8: the title (green if `correct`, else red), then the panels, each under
    its caption: the image with the heat map of `scores` and the boxes, the image with the `cam`
    heat map (and the ground truth), the crop; a colour bar under each heat map, the legend of the
    boxes drawn, and the texture strip if given. `regions` are (box, weight) pairs, `tokens` the
    boxes of selected patches."""
    size = image.shape[0]
    picture = _panel(image)
    left = _heat(picture, scores, cv2.INTER_NEAREST) if scores is not None else picture.copy()
    for token in tokens or []:
        _box(left, token, size, CYAN, 1)
    if truth is not None:
        _box(left, truth, size, WHITE)
    for region, weight in regions or []:
        _box(left, region, size, YELLOW, 2 if weight > 0 else 1)
        x, y = (int(round(v * PANEL / size)) for v in region[:2])
        cv2.putText(left, f"{weight:.2f}", (x + 3, y + 12), FONT, 0.35, YELLOW, 1, cv2.LINE_AA)
    if box is not None:
        _box(left, box, size, GREEN)
    panels = [(left, scores_name if scores is not None else "image", scores is not None)]
    if cam is not None:
        right = _heat(picture, cam, cv2.INTER_LINEAR)
        if truth is not None:
            _box(right, truth, size, WHITE)
        panels.append((right, cam_name, True))
    if crop_img is not None:
        panels.append((_panel(crop_img), "crop (second pass)", False))
    heat_maps = any(heat for *_, heat in panels)
    columns = [np.concatenate([_caption(name, PANEL), panel] + ([colour_bar(PANEL) if heat else _strip(BAR, PANEL)]
                                                                if heat_maps else []), axis=0)
               for panel, name, heat in panels]
    gap = _strip(columns[0].shape[0], GAP)
    rows = [np.concatenate([part for column in columns for part in (gap, column)][1:], axis=1)]
    width = max(rows[0].shape[1], strip.shape[1] if strip is not None else 0)
    entries = [(box_name, GREEN)] * (box is not None) + [("ground truth", WHITE)] * (truth is not None) \
        + [("selected tokens", CYAN)] * bool(tokens) + [("texture regions (gate weight)", YELLOW)] * bool(regions)
    if entries:
        rows.append(legend(entries, width))
    if strip is not None:
        filters = (strip.shape[1] - PANEL) // (PANEL // 2)
        rows += [_caption(f"best texture region | its {filters} strongest Gabor filters: kernel above response",
                          strip.shape[1]), strip]
    return _stack([title_rows(title, width, GREEN if correct else RED), *rows])


def tokens_to_map(tokens: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
    """ViT tokens (B, prefix + h*w, D) -> the patches as a map (B, D, h, w): the prefix tokens (CLS,
    registers, distillation) dropped."""
    return tokens[:, prefix:].unflatten(1, grid).permute(0, 3, 1, 2)


def cam_target(model: nn.Module, image_hw: tuple[int, int], block: int = -1) -> tuple[nn.Module, Callable | None]:
    """The layer of a timm model whose activations a CAM weighs, and the reshape of its output to
    (B, C, h, w) (None where it is one). A ViT: `block`'s norm1, the input of its attention (the
    patches reach the CLS token only through attention: at a block's output their gradient would
    be 0), its tokens laid out on the patch grid of `image_hw`. A CNN: its last feature map, timm's
    last `feature_info` module (a ResNet's layer4; some models add a conv head after it)."""
    if not hasattr(model, "num_prefix_tokens"):
        return model.get_submodule(model.feature_info[-1]["module"]), None
    grid = patch_layout(model, image_hw)[0]
    return model.blocks[block].norm1, partial(tokens_to_map, prefix=model.num_prefix_tokens, grid=grid)


class FirstPassLogits(nn.Module):
    """An FGVRModel as pytorch-grad-cam wants it: images (0-255) -> logits, with `tap`, the CAM's
    target layer, seeing `layer`'s output in the backbone's first pass only.

    With a selector (or CAL's test-time crop) the backbone runs twice per forward, so `layer` fires
    twice; pytorch-grad-cam keeps an activation per firing in forward order and a gradient per
    firing in the order backward reaches them, reshapes each with the first pass's grid (a crop
    pass at another crop_size does not fit it) and weighs the first activation with the first
    gradient: right only while backward reaches the passes in reverse order. `tap` fires once, in
    the first pass; the CAM is still of the whole model's logit (global and crop features).
    The images require grad, so the layer's output has one even where the backbone is frozen."""

    def __init__(self, model: FGVRModel, layer: nn.Module):
        super().__init__()
        self.model, self.layer, self.tap = model, layer, nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fired = False

        def first_pass(module, inputs, output):
            nonlocal fired
            if not fired:
                fired = True
                return self.tap(output)

        hook = self.layer.register_forward_hook(first_pass)
        try:
            return self.model(images.detach().requires_grad_())[0]
        finally:
            hook.remove()


def class_activation_maps(model: FGVRModel, images: torch.Tensor, cam: str, preds: list[int]) -> np.ndarray:
    """pytorch-grad-cam's `cam` (a CAMS key) for a batch of images (B, 3, H, W; 0-255) -> (B, H, W)
    maps in [0, 1]: of each image's predicted class `preds` (FinerCAM: the predicted class against
    the 3 classes whose logits are nearest it, its default), on the layer `cam_target` chooses of
    the first pass. A token method's (TransFG, FFVT, IELT) last block sees its selected tokens only:
    its CAM is on the block before."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer, reshape = cam_target(model.backbone.model, (model.input_size, model.input_size),
                                -2 if model.method is not None else -1)
    logits = FirstPassLogits(model, layer)
    method = getattr(pytorch_grad_cam, CAMS[cam][0])(logits, [logits.tap], reshape)  # its hooks go with `tap`
    with torch.enable_grad():
        maps = method(images, None if cam == "finercam" else [ClassifierOutputTarget(c) for c in preds])
    logits.zero_grad()  # the weights' gradients the backward left
    return maps


@torch.no_grad()
def visualise(cfg: VizConfig) -> list[Path]:
    """Write the figures for the first cfg.n images of the split; returns their paths."""
    check_values(cfg, VizConfig)
    check_split(cfg.split)
    if cfg.cam != "none" and cfg.cam not in CAMS:
        raise ConfigError(f"cam={cfg.cam}: choose one of none, {', '.join(CAMS)}")
    out_dir = output_path(checkpoint_path(cfg.ckpt), cfg.out, lambda run: run.viz, _is_viz_dir)
    run = load_run(cfg.ckpt, cfg.device, cfg.data_root, skip_bad=cfg.skip_bad)
    model, classes = run.model, run.state["classes"]
    index = _read_index(out_dir)
    earlier = index.get(cfg.split, [])
    if earlier:
        log.warning("replacing the %d %s figures already in %s", len(earlier), cfg.split, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, paths = [], []
    scores_name, cam_name = _scores_name(model), CAMS[cfg.cam][1] if cfg.cam != "none" else ""
    with run.loaders:  # their workers end here, not at exit
        for batch in split_loader(run, cfg.split):
            images = batch.images.to(run.device).float()
            logits, extras = model(images, batch.boxes.to(run.device))
            shown = model.to_input(images)  # what the first pass saw, at the input size
            preds = logits.argmax(-1).cpu().tolist()
            count = min(len(images), cfg.n - len(paths))
            # Of the images drawn only: the backward holds the activations of every image it is given.
            cams = class_activation_maps(model, images[:count], cfg.cam, preds[:count]) if cfg.cam != "none" else None
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
            for i in range(count):
                pred, label = preds[i], int(batch.labels[i])
                truth = truths[i].tolist() if truths[i].isfinite().all() else None
                title = f"pred {classes[pred]} ({'right' if pred == label else 'wrong'}) | label {classes[label]}"
                figure = render(_to_uint8(shown[i]), scores[i] if scores is not None else None,
                                boxes[i] if boxes is not None else None, truth,
                                _to_uint8(crops[i]) if crops is not None else None, title, pred == label,
                                regions[i] if regions is not None else None, strips[i] if strips is not None else None,
                                tokens[i] if tokens is not None else None, cam=cams[i] if cams is not None else None,
                                scores_name=scores_name, cam_name=f"{cam_name}: {classes[pred]}",
                                box_name="crop box" if cropped else "box around the tokens")
                path = out_dir / f"{cfg.split}_{len(paths):03d}.png"
                # zlib level 6, default strategy: a third of the size OpenCV's default (level 1, RLE) gives noisy images
                if not cv2.imwrite(str(path), figure[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 6]):
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


def _scores_name(model: FGVRModel) -> str:
    """What the heat map of the model's own scores is: its selector's or method's name for them."""
    name = getattr(model.method or model.selector, "name", "")
    return SCORE_NAMES.get(name, f"{name} scores")


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
