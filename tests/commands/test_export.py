"""fgvr export: the whole model as ONNX, TorchScript or a .pt2, with a dynamic batch size, checked
against PyTorch; one-line refusals; atomic writes that leave nothing behind on failure."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from fgvr.runtime.errors import ConfigError, FgvrError
from tests.conftest import TINY, fgvr

GLSIM = ("selector=glsim", "head=aggregator")


def train_tiny(run_dir: Path, *overrides: str) -> Path:
    """A 1-epoch TINY run (as the train_run fixture, for a fixture shared by a module's tests)."""
    from hydra import compose, initialize_config_dir

    from fgvr.engine.trainer import train
    from fgvr.runtime.config import config_dir, register_schemas
    from fgvr.runtime.tracker import RunInfo

    register_schemas()
    on_files = any(o.startswith("data=") and o != "data=synth" for o in overrides)
    base = [o for o in TINY if not o.startswith("data.synth.")] + ["data.check_counts=false"] if on_files else TINY
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*base, "trainer.epochs=1", *overrides])
    run_dir.mkdir(parents=True)
    train(cfg, RunInfo(run_dir, "test", choices={}))
    return run_dir


@pytest.fixture(scope="module")
def glsim_run(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("glsim") / "run", *GLSIM)


def export_cfg(*overrides: str):
    from hydra import compose, initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("export", overrides=list(overrides))


def images(n: int, size: int = 32, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def pytorch(run_dir: Path, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The run's model in PyTorch, built from its checkpoint as fgvr eval builds it: (logits, extras)."""
    from fgvr.engine.evaluate import load_config, load_model

    path, state, cfg = load_config(str(run_dir))
    model = load_model(path, state, cfg, torch.device("cpu"))
    with torch.no_grad():
        logits, extras = model(x)
    return logits, extras | {"input_size": model.input_size, "classes": state["classes"]}


def run_export(path: Path, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of an exported file on images, through the runtime a user would load it with."""
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation note
        module = torch.jit.load(path) if path.suffix == ".ts" else torch.export.load(path).module()
    with torch.no_grad():
        out = module(x)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def assert_matches_pytorch(run_dir: Path, path: Path, batch_sizes=(1, 5), boxes: bool = True) -> None:
    for n in batch_sizes:  # neither is the batch size the export traced (3) or checked (2) with
        x = images(n, seed=n)
        expected, extras = pytorch(run_dir, x)
        got = run_export(path, x)
        assert got[0].shape == expected.shape
        assert (got[0] - expected).abs().max() < 1e-4
        if boxes:
            assert len(got) == 2
            torch.testing.assert_close(got[1], extras["boxes"] / extras["input_size"], atol=1e-5, rtol=0)
            assert ((0 <= got[1]) & (got[1] <= 1)).all()


def test_glsim_exports_to_onnx_with_a_dynamic_batch(glsim_run):
    """The done-when test: GLSim (selection, crop and aggregator head) in ONNX, through onnxruntime,
    at batch sizes other than the traced one, within 1e-4 of PyTorch; class names in the file."""
    from fgvr.commands.export import export, read_metadata

    out = export(export_cfg(f"ckpt={glsim_run}", "format=onnx"))
    assert out == glsim_run / "export" / "model.onnx"
    assert_matches_pytorch(glsim_run, out)
    meta = read_metadata(out)
    assert meta["classes"] == pytorch(glsim_run, images(1))[1]["classes"]
    assert meta["image_size"] == 32 and meta["outputs"] == ["logits", "boxes"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # one file, no temporary left


@pytest.mark.parametrize("fmt,suffix", [("torchscript", ".ts"), ("exported", ".pt2")])
def test_torchscript_and_exported_program_match_pytorch(glsim_run, tmp_path, fmt, suffix):
    from fgvr.commands.export import export, is_export, read_metadata

    out = export(export_cfg(f"ckpt={glsim_run}/checkpoints/last.pt", f"format={fmt}", f"out={tmp_path}/m{suffix}",
                            "batch_size=4"))
    assert out == tmp_path / f"m{suffix}"
    assert_matches_pytorch(glsim_run, out)
    assert read_metadata(out)["classes"] == pytorch(glsim_run, images(1))[1]["classes"]
    assert is_export(out, fmt) and not is_export(out, "onnx")  # so a later export replaces it, and only that


def test_an_earlier_export_is_replaced(glsim_run, tmp_path):
    from fgvr.commands.export import export

    out = export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={tmp_path}/m.ts"))
    assert export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={out}")) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ts"]


def test_what_is_not_an_earlier_export_is_never_replaced(glsim_run, tmp_path):
    from fgvr.commands.export import export

    mine = tmp_path / "model.pt2"
    mine.write_text("mine")
    ts = export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={tmp_path}/m.ts"))
    for out, fmt in ((mine, "exported"), (ts, "exported"), (ts, "onnx")):  # a file of mine; an export of another format
        with pytest.raises(ConfigError, match=f"^out={out}: something else is there already"):
            export(export_cfg(f"ckpt={glsim_run}", f"format={fmt}", f"out={out}"))
    assert mine.read_text() == "mine"


def test_a_failed_check_leaves_nothing_and_keeps_an_earlier_export(glsim_run, tmp_path, monkeypatch):
    from fgvr.commands import export as command

    out = tmp_path / "deploy" / "model.ts"
    command.export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={out}"))
    before = out.read_bytes()
    runner = command.RUNNERS["torchscript"]
    monkeypatch.setitem(command.RUNNERS, "torchscript", lambda path, x: runner(path, x) + 0.01)
    with pytest.raises(FgvrError) as error:
        command.export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={out}"))
    message = str(error.value)
    assert "\n" not in message and "0.01" in message and "tolerance=0.001" in message
    assert out.read_bytes() == before
    assert leftovers(out.parent) == []
    # A looser tolerance accepts the same difference.
    command.export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={out}", "tolerance=0.1"))

    fresh = tmp_path / "new" / "sub" / "model.ts"  # folders the export makes go again on failure
    with pytest.raises(FgvrError):
        command.export(export_cfg(f"ckpt={glsim_run}", "format=torchscript", f"out={fresh}"))
    assert not (tmp_path / "new").exists()


def test_an_exporter_error_is_one_line_naming_the_method_and_format(glsim_run, tmp_path, monkeypatch):
    from fgvr.commands import export as command

    def broken(module, example, path, metadata, opset):
        path.write_bytes(b"half a file")
        raise RuntimeError("no translation for aten::frobnicate\nmore lines")

    monkeypatch.setitem(command.EXPORTERS, "exported", broken)
    with pytest.raises(FgvrError, match=r"^selector=glsim cannot be exported as format=exported: RuntimeError: no "
                                        r"translation for aten::frobnicate$"):
        command.export(export_cfg(f"ckpt={glsim_run}", "format=exported", f"out={tmp_path}/export/m.pt2"))
    assert list(tmp_path.iterdir()) == []


def test_an_export_whose_batch_size_is_fixed_fails_its_check(glsim_run, tmp_path, monkeypatch):
    """The check runs another batch size than the trace: a graph traced static is caught."""
    from fgvr.commands import export as command

    def static(module, example, path, metadata, opset):
        torch.export.save(torch.export.export(module, (example,)), path)

    monkeypatch.setitem(command.EXPORTERS, "exported", static)
    with pytest.raises(FgvrError, match="does not run at batch size 2 \\(traced at 3\\)"):
        command.export(export_cfg(f"ckpt={glsim_run}", "format=exported", f"out={tmp_path}/m.pt2"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,fmt,refusal", [
    (("selector=oracle",), "onnx", "selector=oracle: it crops the ground-truth boxes"),
    (("selector=random",), "exported", "selector=random: it draws its boxes at random"),
    (("method=cal", "backbone=resnet_micro", "method.num_maps=4"), "torchscript",
     "method=cal: torch.jit.trace cannot follow its test-time crop"),
])
def test_what_cannot_be_exported_is_refused_in_one_line(compose, overrides, fmt, refusal):
    from fgvr.commands.export import check_exportable, describe
    from fgvr.models.model import build_model

    model = build_model(compose(*TINY, *overrides), 4).eval()
    with pytest.raises(ConfigError) as error:
        check_exportable(model, describe(model), fmt)
    assert str(error.value).startswith(refusal) and "\n" not in str(error.value)


# Every region method in every format (the README's table): what exports matches PyTorch at other batch
# sizes, boxes included; what cannot is refused in one line naming the method and the format.
METHODS = {
    "none": (),
    "glsim_original": ("selector=glsim", "selector.crop_source=original"),  # images at 2x the input size
    "rollout": ("selector=rollout",),
    "center": ("selector=center",),
    "gabor": ("texture=gabor", "texture.region_size=16"),
    "glsim_gabor": ("selector=glsim", "texture=gabor", "texture.regions=glsim", "texture.region_size=16"),
    "transfg": ("method=transfg",),
    "ffvt": ("method=ffvt", "method.num_token=2"),
    "ielt": ("method=ielt", "method.vote_k=4", "method.total_num=8"),
    "cal": ("method=cal", "backbone=resnet_micro", "method.num_maps=4"),
}
REFUSED = {
    ("cal", "torchscript"): "method=cal: torch.jit.trace cannot follow",
    ("gabor", "torchscript"): "texture=gabor: the texture branch's filter magnitudes",
    ("glsim_gabor", "torchscript"): "selector=glsim texture=gabor: the texture branch's filter magnitudes",
}
METHOD_CASES = [pytest.param(name, fmt, id=f"{name}-{fmt}") for name in METHODS
                for fmt in ("onnx", "torchscript", "exported")]


@pytest.fixture(scope="module")
def method_runs(tmp_path_factory):
    root, runs = tmp_path_factory.mktemp("methods"), {}

    def run(name: str) -> Path:
        if name not in runs:
            runs[name] = train_tiny(root / name, *METHODS[name])
        return runs[name]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name,fmt", METHOD_CASES)
def test_every_method_exports_or_says_why_not(method_runs, tmp_path, name, fmt):
    from fgvr.commands.export import FILE_NAMES, export

    run_dir = method_runs(name)
    out = tmp_path / FILE_NAMES[fmt]
    if (name, fmt) in REFUSED:
        with pytest.raises(ConfigError, match=f"^{REFUSED[name, fmt]}"):
            export(export_cfg(f"ckpt={run_dir}", f"format={fmt}", f"out={out}"))
        assert list(tmp_path.iterdir()) == []
        return
    try:
        export(export_cfg(f"ckpt={run_dir}", f"format={fmt}", f"out={out}"))
    except FgvrError as e:
        assert "\n" not in str(e) and f"format={fmt}" in str(e)
        raise
    size = 64 if name == "glsim_original" else 32
    for n in (1, 4):
        x = images(n, size, seed=n)
        expected, extras = pytorch(run_dir, x)
        got = run_export(out, x)
        assert (got[0] - expected).abs().max() < 1e-4
        assert len(got) == 1 + ("boxes" in extras)
        if "boxes" in extras:  # the selection (top-k, sorts, votes) as PyTorch's
            torch.testing.assert_close(got[1], extras["boxes"] / extras["input_size"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_onnx_external_data_moves_with_the_model(glsim_run, tmp_path, monkeypatch):
    """A model over protobuf's 2 GB is saved with its weights in <name>.data beside it: both are moved
    into place together, and a later export with inline weights removes the stale data file."""
    from torch.onnx import ONNXProgram

    from fgvr.commands.export import export

    save = ONNXProgram.save
    monkeypatch.setattr(ONNXProgram, "save", lambda self, path, **kw: save(self, path, external_data=True))
    out = export(export_cfg(f"ckpt={glsim_run}", "format=onnx", f"out={tmp_path}/m.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert_matches_pytorch(glsim_run, out, batch_sizes=(4,))
    monkeypatch.setattr(ONNXProgram, "save", save)
    export(export_cfg(f"ckpt={glsim_run}", "format=onnx", f"out={out}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert_matches_pytorch(glsim_run, out, batch_sizes=(4,))


@pytest.mark.slow
def test_cli_errors_are_one_line(glsim_run, tmp_path):
    loose = tmp_path / "loose.pt"
    shutil.copy(glsim_run / "checkpoints" / "last.pt", loose)
    unrelated = tmp_path / "notes.onnx"
    unrelated.write_text("mine")
    for args, message in [
        ((f"ckpt={loose}",), f"ckpt={loose} is not inside a run dir"),
        ((f"ckpt={glsim_run}", f"out={unrelated}"), f"out={unrelated}: something else is there already"),
        ((f"ckpt={glsim_run}", "format=tflite"), "format=tflite: choose one of onnx, torchscript, exported"),
        ((f"ckpt={glsim_run}", "tolerance=0"), "tolerance=0"),
    ]:
        proc = fgvr("export", *args, cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"fgvr export: error: {message}") and proc.stderr.count("\n") == 1, proc.stderr
    assert unrelated.read_text() == "mine"
    proc = fgvr("export", f"ckpt={loose}", "format=torchscript", f"out={tmp_path}/m.ts", cwd=tmp_path)
    assert "max |logit difference| to PyTorch" in proc.stdout + proc.stderr and (tmp_path / "m.ts").is_file()
