"""`fgvr bench`: the numbers, their JSON, the table and bad settings."""

import json
import time

import pytest
import torch

from fgvr.engine.bench import bench, peak_tflops
from fgvr.engine.session import Session, StepTimer
from fgvr.runtime.errors import ConfigError
from tests.conftest import TINY, fgvr

QUICK = [*TINY, "bench.warmup=1", "bench.steps=3", "bench.eval_steps=2"]
STEP_KEYS = {"data_wait", "forward", "select_crop", "backward", "optimizer", "model_step", "loop_step"}


def test_bench_prints_a_table_and_writes_its_numbers(tmp_path):
    """A sweep of two benches: each job's bench.json in its own dir, no training summary."""
    proc = fgvr("bench", "--multirun", *QUICK, "selector=glsim,none", "head=aggregator", cwd=tmp_path)
    glsim, plain = (json.loads(p.read_text()) for p in
                    sorted((tmp_path / "outputs" / "bench" / "multirun").glob("*/*/*/bench.json")))
    for key in ("train_img_per_s", "model_train_img_per_s", "eval_img_per_s", "model_eval_img_per_s",
                "data_img_per_s", "peak_mem_mb", "train_tflops"):
        assert glsim[key] > 0, key
    assert glsim["selector"] == "glsim" and glsim["head"] == "aggregator" and glsim["precision"] == "fp32"
    assert set(glsim["step_ms"]) == STEP_KEYS and all(v >= 0 for v in glsim["step_ms"].values())
    split = sum(glsim["step_ms"][k] for k in ("forward", "select_crop", "backward", "optimizer"))
    assert split == pytest.approx(glsim["step_ms"]["model_step"], rel=0.01)
    assert 0 < glsim["select_crop_pct"] < 100 and 0 <= glsim["data_wait_pct"] < 100
    flops = glsim["gflops_per_image"]
    assert flops["total"] > flops["first_pass"] + flops["second_pass"] - 1e-6  # two passes and the head
    assert glsim["mfu_pct"] is None and glsim["peak_tflops"] is None  # no known peak on a CPU
    assert plain["selector"] == "none" and plain["select_crop_pct"] is None and plain["step_ms"]["select_crop"] == 0
    assert proc.stdout.count("train, whole loop") == 2 and "selector+crop" in proc.stdout and "MFU n/a" in proc.stdout
    assert "no results" not in proc.stdout + proc.stderr


@pytest.fixture
def compose_bench():
    """Compose bench.yaml as `fgvr bench` does (its schema in place of train's, restored after)."""
    from hydra import compose, initialize_config_dir

    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas(bench=True)

    def _compose(*overrides: str):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return compose("bench", overrides=[*QUICK, *overrides])

    yield _compose
    register_schemas()


def test_bench_out_and_a_given_peak(compose_bench, tmp_path, capsys):
    out = bench(compose_bench("bench.peak_tflops=1.0", f"bench.out={tmp_path / 'new' / 'b.json'}"))
    assert out == json.loads((tmp_path / "new" / "b.json").read_text())  # its folder made
    assert "train, whole loop" in capsys.readouterr().out
    # against the given peak; train_tflops is rounded to 4 decimals, which on a slow CPU is most of it
    assert out["mfu_pct"] == pytest.approx(100 * out["train_tflops"], rel=0.01, abs=0.006)


@pytest.mark.parametrize("override,message", [
    ("bench.steps=0", "bench.steps=0: must be >= 1"),
    ("trainer.devices=2", "trainer.devices: fgvr bench measures one process"),
])
def test_bad_bench_settings_are_refused_before_any_work(compose_bench, override, message):
    with pytest.raises(ConfigError, match=message):
        bench(compose_bench(override))


def test_unknown_bench_key_is_one_line(tmp_path):
    proc = fgvr("bench", "bench.step=3", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("fgvr bench: error: bench.step: no such config key; valid keys under bench: "
                                   "eval_steps, out, peak_tflops, steps, warmup")


def test_step_timer_gives_the_median_of_each_phase_summed_over_a_step():
    """A step of two micro-batches marks forward and backward twice: the step's time in each phase is their sum."""
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        timer.mark("start")
        for _ in range(2):
            time.sleep(0.005)
            timer.mark("a")
            time.sleep(0.015)
            timer.mark("b")
    phases = timer.phases_ms()
    assert list(phases) == ["a", "b"] and 10 <= phases["a"] < 25 and 30 <= phases["b"] < 45


def test_bench_times_the_trainers_step(train_run, compose_bench, monkeypatch):
    """One step implementation: bench and train both call Session.step, with trainer.accum_steps
    micro-batches in each; bench's img/s count all of a step's images."""
    calls = []
    step = Session.step

    def spy(self, batches, timer=None):
        calls.append(len(batches))
        return step(self, batches, timer)

    monkeypatch.setattr(Session, "step", spy)
    out = bench(compose_bench("trainer.accum_steps=2"))
    assert out["accum_steps"] == 2 and calls == [2] * 8  # warm-up and timed steps, model alone and whole loop
    calls.clear()
    results, _ = train_run("trainer.epochs=1", "trainer.accum_steps=2")
    assert calls == [2] * results["steps"] and results["steps"] > 0


def test_peak_is_looked_up_by_gpu_name_and_precision(monkeypatch):
    gpu = torch.device("cuda", 0)
    assert peak_tflops(torch.device("cpu"), None, None) is None and peak_tflops(torch.device("cpu"), None, 2.5) == 2.5
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(gpu, torch.bfloat16, None) == 989.0 and peak_tflops(gpu, None, None) == 67.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(gpu, torch.bfloat16, None) == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce GTX 1080")
    assert peak_tflops(gpu, torch.bfloat16, None) is None


@pytest.mark.slow
def test_bench_reports_the_compile_time(tmp_path):
    fgvr("bench", *QUICK, "trainer.compile=true", f"bench.out={tmp_path / 'b.json'}", cwd=tmp_path)
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["compile"] and out["compile_s"] > 0 and out["model_train_img_per_s"] > 0


def test_flops_count_fused_attention_on_the_cpu():
    """torch's counter knows only the CUDA attention kernels; ViT-B/16 at 224 is 17.6 GMACs with attention."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    from fgvr.engine.cost import ATTENTION_FLOPS

    model = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter:
        model(torch.zeros(1, 3, 224, 224))
    assert counter.get_total_flops() / 2e9 == pytest.approx(17.56, abs=0.01)


def test_an_epochs_steps_end_where_the_shard_ends():
    """A run resumed mid-epoch with more processes than it began with plans its steps from the old
    position; its shard can end first, and the epoch then ends there (a partial step is not taken)."""
    from fgvr.engine.session import _steps

    assert list(_steps(iter(range(7)), steps=5, accum_steps=2)) == [[0, 1], [2, 3], [4, 5]]
    assert list(_steps(iter(range(9)), steps=2, accum_steps=2)) == [[0, 1], [2, 3]]
