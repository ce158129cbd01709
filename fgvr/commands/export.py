"""`fgvr export ckpt=<run dir or .pt> format=onnx|torchscript|exported`: a trained run's whole model (selector,
crop, texture branch or method included) as one file with a dynamic batch size, checked against PyTorch.

The exported graph takes uint8 RGB images (B, 3, S, S), S = data.img_size x the source scale the run's
loaders used (normalisation happens inside), and returns the logits (B, classes) and, for a model with a
region (a selector's crop, a method's box), `boxes` (B, 4): x1 y1 x2 y2 as fractions of the image. The
file says what it is: `fgvr.json` (classes, image size, outputs) among a .ts's or .pt2's extra files, the
same keys (JSON values) in an .onnx's metadata_props.

After writing, the file is loaded back (onnxruntime, torch.jit.load, torch.export.load) and run on
random images at another batch size than the one traced; the export fails unless its logits are within
`tolerance` of PyTorch's. It is written under a temporary name beside `out` and moved into place only
then, so a failed export leaves nothing and keeps an earlier one."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fgvr import __version__
from fgvr.commands.eval import output_path
from fgvr.engine.evaluate import checkpoint_path, load_config, load_model
from fgvr.models.model import FGVRModel
from fgvr.runtime.config import ExportConfig, ExportFormat, check_values
from fgvr.runtime.errors import ConfigError, FgvrError, first_line

log = logging.getLogger(__name__)

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.ts", "exported": "model.pt2"}
METADATA = "fgvr.json"  # the extra file of a .ts or .pt2 that describes it
SEED = 0  # of the random images the export is traced and checked with


class Deployable(nn.Module):
    """What is exported: uint8 images (B, 3, S, S) at the loaders' size -> logits (B, classes), or
    (logits, boxes (B, 4) as fractions of the image) when `boxes`; the model's evaluation forward."""

    def __init__(self, model: FGVRModel, boxes: bool):
        super().__init__()
        self.model, self.boxes = model.eval(), boxes

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        logits, extras = self.model(images)
        return (logits, extras["boxes"] / self.model.input_size) if self.boxes else logits


def export(cfg: ExportConfig) -> Path:
    """Export the checkpoint's model in cfg.format to cfg.out (default <run dir>/export/model.<ext>),
    check it against PyTorch and return where it went."""
    check_values(cfg, ExportConfig)
    fmt = ExportFormat(cfg.format).value
    out = output_path(checkpoint_path(cfg.ckpt), cfg.out, lambda run: run.path / "export" / FILE_NAMES[fmt],
                      lambda path: is_export(path, fmt))
    path, state, run_cfg = load_config(cfg.ckpt)
    model = load_model(path, state, run_cfg, torch.device("cpu"))
    what = describe(model)
    check_exportable(model, what, fmt)
    size = round(model.input_size * model.source_scale)  # as the loaders resize (build_loaders)
    traced_batch = 3 if cfg.batch_size == 2 else 2  # the check runs another batch size than the trace
    example, images = random_images(traced_batch, size, SEED), random_images(cfg.batch_size, size, SEED + 1)
    with torch.no_grad():
        expected, extras = model(images)
    module = Deployable(model, "boxes" in extras)
    outputs = ["logits", "boxes"] if module.boxes else ["logits"]
    metadata = {"classes": list(state["classes"]), "image_size": size, "input": "images: uint8 RGB (B, 3, S, S)",
                "outputs": outputs, "format": fmt, "model": what, "fgvr": __version__, "checkpoint": str(path),
                "epoch": state.get("epoch")}
    start = time.perf_counter()
    with staging(out) as staged:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and deprecation notes: the check below is what counts
                EXPORTERS[fmt](module, example, staged, metadata, cfg.opset)
        except Exception as e:  # the exporters' errors, for code or ops they cannot follow
            log.debug("export failed", exc_info=True)
            raise FgvrError(f"{what} cannot be exported as format={fmt}: {reason(e)}") from e
        elapsed = time.perf_counter() - start
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = RUNNERS[fmt](staged, images)
        except Exception as e:
            log.debug("running the export failed", exc_info=True)
            raise FgvrError(f"{what} as format={fmt} does not run at batch size {cfg.batch_size} (traced at "
                            f"{traced_batch}): {reason(e)}") from e
        diff = (got.float() - expected.float()).abs().max().item()
        log.info("max |logit difference| to PyTorch: %.3g on %d random images (traced at batch size %d)", diff,
                 cfg.batch_size, traced_batch)
        if not diff <= cfg.tolerance:  # NaN fails too
            raise FgvrError(f"the {fmt} export of {what} differs from PyTorch by up to {diff:.3g} in its logits, "
                            f"over tolerance={cfg.tolerance}; nothing written")
    log.info("%s as %s: uint8 images (B, 3, %d, %d) -> %s (%.1f MB, exported in %.1fs) -> %s", what, fmt, size, size,
             " + ".join(outputs), out.stat().st_size / 2**20, elapsed, out)
    return out


def describe(model: FGVRModel) -> str:
    """'selector=glsim texture=gabor', 'method=cal', 'selector=none' (the plain backbone): the model, for messages."""
    parts = [f"method={model.method.name}"] if model.method is not None else []
    parts += [f"selector={model.selector.name}"] if model.selector is not None else []
    parts += ["texture=gabor"] if model.texture is not None else []
    return " ".join(parts) or "selector=none"


def check_exportable(model: FGVRModel, what: str, fmt: str) -> None:
    """Refuse, in one line, what no export can reproduce, and what a format cannot follow."""
    selector = model.selector
    if selector is not None and selector.needs_boxes:
        raise ConfigError(f"{what}: it crops the ground-truth boxes of labelled data, which a deployed model is not "
                          "given; it cannot be exported")
    if selector is not None and selector.name == "random":
        raise ConfigError(f"{what}: it draws its boxes at random on every call (a baseline), so no export could "
                          "reproduce its predictions; it is not exported")
    if fmt != "torchscript":
        return
    if model.method is not None and model.method.name == "cal":
        raise ConfigError(f"{what}: torch.jit.trace cannot follow its test-time crop (box sizes computed in Python "
                          "from the image size); use format=onnx or format=exported")
    if model.texture is not None:
        raise ConfigError(f"{what}: the texture branch's filter magnitudes and soft histograms are custom autograd "
                          "functions, which a TorchScript file cannot hold; use format=onnx or format=exported")


def random_images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def capture(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch size: non-strict (it runs the Python: hooks, context managers), else
    strict (Dynamo: it keeps len(x) symbolic), the order torch.onnx tries them in. Unlike torch.onnx's own
    capture, a batch size the code fixes is an error here, not a graph silently made static."""
    dynamic = ({0: torch.export.Dim("batch", min=1)},)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
    except Exception as first:
        try:
            return torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=True)
        except Exception:
            raise first from None  # the non-strict error says more (where the batch size was fixed, say)


def export_exported(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict, opset: int | None) -> None:
    """As ATen inference IR (`run_decompositions({})` decomposes nothing else): the training IR keeps the
    methods' float32 regions as autocast higher-order ops, which a saved .pt2 cannot load back."""
    program = capture(module, example).run_decompositions({})
    torch.export.save(program, path, extra_files={METADATA: json.dumps(metadata)})


def export_torchscript(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict,
                       opset: int | None) -> None:
    traced = torch.jit.trace(module, (example,), check_trace=False)
    torch.jit.save(traced, path, _extra_files={METADATA: json.dumps(metadata)})


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, metadata: dict, opset: int | None) -> None:
    """Through torch.export (`capture`) and the dynamo exporter; weights inline, or beside it as
    <name>.data once over the 2 GB a protobuf holds (the exporter decides)."""
    program = torch.onnx.export(capture(module, example), (example,), dynamo=True, opset_version=opset,
                                input_names=["images"], output_names=metadata["outputs"],
                                custom_translation_table=onnx_translations(), verbose=False)
    program.model.metadata_props.update({k: json.dumps(v) for k, v in metadata.items()})
    program.save(path)


def onnx_translations() -> dict[Callable, Callable]:
    """ONNX for the ops torch.onnx has no translation of: a stable sort (IELT's vote ranking) as TopK,
    which breaks ties by the lower index as a stable sort does, and searchsorted (IELT's per-block
    counts) as a count of the boundaries below each value."""
    from onnxscript import INT32, INT64
    from onnxscript import opset18 as op

    def sort_stable(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
        size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
        return op.TopK(self, size, axis=dim, largest=descending, sorted=True)

    def searchsorted(sorted_sequence, self, out_int32: bool = False, right: bool = False, side: str | None = None,
                     sorter=None):
        if sorter is not None:
            raise NotImplementedError("searchsorted with a sorter")
        bounds = op.Unsqueeze(sorted_sequence, op.Constant(value_ints=[-2]))  # (..., 1, L)
        values = op.Unsqueeze(self, op.Constant(value_ints=[-1]))  # (..., T, 1)
        below = op.LessOrEqual(bounds, values) if right or side == "right" else op.Less(bounds, values)
        counts = op.ReduceSum(op.Cast(below, to=INT64.dtype), op.Constant(value_ints=[-1]), keepdims=0)
        return op.Cast(counts, to=INT32.dtype) if out_int32 else counts

    return {torch.ops.aten.sort.stable: sort_stable, torch.ops.aten.searchsorted.Tensor: searchsorted}


def run_exported(path: Path, images: torch.Tensor) -> torch.Tensor:
    return _logits(torch.export.load(path).module()(images))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    return _logits(torch.jit.load(path)(images))


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def _logits(output: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, dict, int | None], None]] = {
    "onnx": export_onnx, "torchscript": export_torchscript, "exported": export_exported}
RUNNERS: dict[str, Callable[[Path, torch.Tensor], torch.Tensor]] = {
    "onnx": run_onnx, "torchscript": run_torchscript, "exported": run_exported}


def reason(error: BaseException) -> str:
    """The innermost cause of an exporter's error in one line (torch.onnx wraps the one that says which op;
    the TorchScript interpreter puts its traceback first and the error last)."""
    while error.__cause__ is not None:
        error = error.__cause__
    if "specialized it to be a constant" in str(error):
        return "its code fixes the batch size while tracing (a Python int taken from a batch tensor, e.g. len(x))"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and "TorchScript interpreter" in lines[0]:
        return lines[-1]
    return first_line(error, typed=True)


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A path with `out`'s name in a fresh folder beside it, to write and check; when the block ends without
    an error, what was written there (the file, and an ONNX export's external data <name>.data) replaces
    `out`, the file last; an earlier export's <name>.data that the new one does not use goes. Nothing is left
    behind on an error, not even a folder this made. `out`, if there, is an earlier export (output_path)."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    replacing, ok = out.exists(), False
    try:
        yield holder / out.name
        written = sorted(holder.iterdir(), key=lambda p: p.name == out.name)
        for file in written:
            os.replace(file, out.parent / file.name)
        stale = out.with_name(f"{out.name}.data")
        if replacing and stale.name not in {p.name for p in written}:
            stale.unlink(missing_ok=True)
        ok = True
    finally:
        shutil.rmtree(holder, ignore_errors=True)
        if not ok:
            for folder in made:  # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break


def is_export(path: Path, fmt: str) -> bool:
    """Whether `path` is an earlier fgvr export in that format (its description read; nothing in it runs)."""
    try:
        return path.is_file() and read_metadata(path).get("format") == fmt
    except Exception:  # not an ONNX model or a zip archive, or one without the description
        return False


def read_metadata(path: Path) -> dict[str, Any]:
    """The description an fgvr export carries: classes, image_size, outputs, format, ... Only that is read:
    an .onnx's metadata_props (not its weights), a .ts's or .pt2's fgvr.json."""
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if not zipped:
        import onnx

        return {p.key: json.loads(p.value) for p in onnx.load(str(path), load_external_data=False).metadata_props}
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(f"/extra/{METADATA}"))
        return json.loads(archive.read(name))
