"""The Python scripts in scripts/, each run on tiny generated data (in-process where it is fast)."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import REPO, TINY


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, argv: list[str], monkeypatch, capsys) -> list[dict]:
    """The script's main() on `argv`; the JSON lines it printed."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    module.main()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_bench_baselines_data_and_glsim(tmp_path, monkeypatch, capsys):
    bench = load_script("bench_baselines")
    monkeypatch.chdir(tmp_path)
    rows = run_main(bench, ["data", "--size", "32", "--images", "10", "--source", "120x90"], monkeypatch, capsys)
    assert [r["pipeline"] for r in rows] == ["pil+torchvision", "fgvr, full decode", "fgvr", "fgvr cache=decoded"]
    assert all(r["source"] == "120x90" for r in rows)
    assert all(r["images"] == 10 and r["img_per_s_per_core"] > 0 for r in rows) and rows[0]["x_pil"] == 1.0
    (row,) = run_main(bench, ["glsim", "--reps", "1", "backbone=vit_micro", "data.img_size=32", "data.batch_size=2"],
                      monkeypatch, capsys)
    assert row["batch"] == 2 and row["size"] == 32 and row["flop_ratio"] > 1 and row["time_ratio"] > 0


def test_bench_baselines_writes_a_folder_set_of_photo_like_jpegs(tmp_path):
    root = load_script("bench_baselines").write_jpegs(tmp_path / "jpegs", 10, classes=2, size=(40, 30))
    train, test = sorted((root / "train").rglob("*.jpg")), sorted((root / "test").rglob("*.jpg"))
    assert len(train) == 8 and len(test) == 2  # every fifth image is a test image
    assert {p.parent.name for p in train} == {"class_0", "class_1"}


@pytest.mark.slow
def test_bench_baselines_timm(tmp_path, monkeypatch, capsys):
    """timm's loop, then `fgvr bench` and `fgvr train` (subprocesses) on the same generated folder."""
    rows = run_main(load_script("bench_baselines"),
                    ["timm", "--size", "32", "--batch", "4", "--images", "20", "--workers", "0", "--warmup", "1",
                     "--steps", "1", "--train-epochs", "1"], monkeypatch, capsys)
    assert [r["runner"] for r in rows] == ["timm loop", "fgvr bench", "fgvr train"]
    assert all(r["img_per_s"] > 0 for r in rows)


def test_zero_shot_localisation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = load_script("zero_shot_localisation")
    script.main([*TINY, "selector=glsim", "data.synth.test_per_class=2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"selector", "random"}
    assert all(r["images"] == 8 and 0 <= r["crop_iou"] <= 1 and 0 <= r["crop_hit"] <= 100 for r in result.values())
    with pytest.raises(SystemExit, match="choose a selector"):
        script.main(TINY)


def test_every_python_script_is_tested():
    # model_cost: in tests/test_cli.py; gpu_check: tests/test_gpu_check.py
    tested = {"bench_baselines", "zero_shot_localisation", "model_cost", "gpu_check"}
    assert {p.stem for p in (REPO / "scripts").glob("*.py")} == tested
