"""The command line as a user meets it: help, config printing, composition and bad input."""

import json
import os
import subprocess
import sys
import time

import pytest

from fgvr.runtime.config import config_dir
from tests.conftest import FGVR, REPO, TINY, fgvr

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def test_top_level_help_is_instant(tmp_path):
    fgvr("--help", cwd=tmp_path)  # warm the file cache
    start = time.perf_counter()
    out = fgvr("--help", cwd=tmp_path).stdout
    assert time.perf_counter() - start < 1.0
    assert "train" in out and "eval" in out


def test_unknown_command(tmp_path):
    proc = fgvr("trian", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "unknown command 'trian'; choose one of train, eval" in proc.stderr


def test_train_help_lists_groups(tmp_path):
    out = fgvr("train", "--help", cwd=tmp_path).stdout
    for group in ("backbone:", "selector:", "texture:", "head:", "data:", "optim:", "logger:", "experiment:"):
        assert group in out
    assert "vit_b16" in out and "+experiment=cub" in out


def test_cfg_job_prints_the_composed_config(tmp_path):
    out = fgvr("train", "--cfg", "job", "backbone=resnet50", "data.img_size=448", cwd=tmp_path).stdout
    assert "name: resnet50.a1_in1k" in out and "img_size: 448" in out
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,message", [
    ("backbone=foo", "backbone=foo: no such option; choose one of resnet101, resnet50, resnet_micro, vit_b16, vit_micro, "
                     "vit_micro_synth, vit_tiny"),
    ("data=imagenet", "data=imagenet: no such option; choose one of aircraft, cars, csv, cub, dogs, flowers, folder, "
                      "inat2017, nabirds, pets,"),
    ("+experiment=nope", "+experiment=nope: no such option; choose one of aircraft, aircraft_vit, cars"),
    ("trainer.epoch=3", "trainer.epoch: no such config key; valid keys under trainer: accum_steps,"),
    ("foo=1", "foo: no such config key; valid keys: backbone, data,"),
    ("trainer.epochs=abc", "trainer.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("data.batch_size=1.5", "data.batch_size: Value '1.5' of type 'float' could not be converted to Integer"),
    ("trainer.precision=fp8", "trainer.precision=fp8: choose one of auto, fp32, bf16, fp16"),
    ("data.format=inat", "data.format=inat: choose one of cub, nabirds, cars, aircraft, dogs, flowers, pets, inat2017, "
                         "folder, csv, synth"),
    ("optim.nesterov=true", "optim.nesterov: no such config key; valid keys under optim: _target_, betas, lr,"),
    ("seed=[1", "overrides look like key=value"),
    ("data=cub", "data.root is not set; pass data.root=/path/to/cub"),
    ("head.bogus=3", "head.bogus: no such config key"),
    ("selector=glsim selector.metric=cosine", "selector.metric=cosine: choose one of cos, l1, l2"),
    ("selector=glsim +selector.topk=4", "selector.topk: no such option; selector takes metric, top_k, box_end,"),
    ("data=cub data.synth.num_classes=4", "an override sets a key inside a section that is null"),
])
def test_bad_overrides_end_in_one_line_with_exit_code_2(tmp_path, override, message):
    proc = fgvr("train", *override.split(), cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert lines[0].startswith("fgvr train: error: ") and message in lines[0], lines[0]


def test_bad_data_root_is_one_line_naming_it(tmp_path):
    proc = fgvr("train", "data=cub", f"data.root={tmp_path / 'nope'}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"fgvr train: error: data.root={tmp_path / 'nope'}: no such folder; point it at the extracted "
        "CUB_200_2011 folder"]


def test_eval_errors(tmp_path):
    proc = fgvr("eval", f"ckpt={tmp_path / 'none'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no such file or run dir" in proc.stderr
    proc = fgvr("eval", "ckpt=x", "splt=val", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fgvr eval: error: splt: no such config key; valid keys: batch_size, ckpt, data_root, device, out, skip_bad, "
        "split, tta")
    proc = fgvr("eval", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "fgvr eval: error: ckpt is required: pass ckpt=..."


def test_run_dirs_single_and_multirun(tmp_path):
    fgvr("train", *TINY, "trainer.epochs=1", cwd=tmp_path)
    (run_dir,) = (tmp_path / "outputs").glob("20*/*_synth")  # outputs/<date>/<time>_<name>
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "results.json").is_file()
    out = fgvr("train", "--multirun", *TINY, "trainer.epochs=1", "seed=1,2", cwd=tmp_path)
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("20*/*_synth")
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["seed"] for r in results] == [1, 2] and all(r["status"] == "finished" for r in results)
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(compose, experiment):
    cfg = compose(f"+experiment={experiment}")
    assert cfg.name and cfg.backbone.name and cfg.data.format


def test_cub_experiment_is_the_reference_recipe(compose):
    cfg = compose("+experiment=cub")
    assert cfg.backbone.name == "vit_base_patch16_224.augreg_in21k" and cfg.backbone.drop_path_rate == 0.1
    assert (cfg.optim._target_, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("torch.optim.SGD", 0.01,
                                                                                              0.9, 0.0)
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_lr, cfg.optim.min_lr) == (500, 1e-6, 1e-5)
    assert (cfg.data.img_size, cfg.data.batch_size, cfg.trainer.epochs) == (224, 8, 50)
    assert (cfg.trainer.grad_clip, cfg.trainer.label_smoothing) == (1.0, 0.1)
    assert cfg.data.augment.trivial_augment and cfg.data.augment.random_erasing == 0.3 and cfg.data.augment.hflip
    assert round(cfg.data.img_size * cfg.data.resize_ratio) == 300
    assert cfg.selector._target_.endswith("GLSimSelector") and cfg.selector.top_k == 8
    assert cfg.selector.box_end == "inclusive" and cfg.head._target_.endswith("AggregatorHead")


@pytest.mark.parametrize("dataset,top_k", [("cub", 8), ("dogs", 16), ("nabirds", 8), ("flowers", 8), ("pets", 8),
                                           ("cars", 8), ("aircraft", 8), ("inat2017", 8)])
def test_each_dataset_has_a_glsim_and_a_plain_vit_experiment_with_one_recipe(compose, dataset, top_k):
    from omegaconf import OmegaConf

    glsim = OmegaConf.to_container(compose(f"+experiment={dataset}"), resolve=True)
    vit = OmegaConf.to_container(compose(f"+experiment={dataset}_vit"), resolve=True)
    assert glsim["data"]["name"] == vit["data"]["name"] == dataset and glsim["selector"]["top_k"] == top_k
    assert vit["selector"] == {} and vit["head"]["_target_"].endswith("LinearHead")
    for key in ("backbone", "data", "optim", "trainer", "seed"):
        assert glsim[key] == vit[key], key  # the baseline differs only in the crop and its head
    assert compose("+experiment=cub_448").data.img_size == 448


def test_gabor_experiments(compose):
    from omegaconf import OmegaConf

    gabor = compose("+experiment=cub_gabor")
    assert gabor.backbone.name == "resnet50.a1_in1k" and gabor.data.img_size == 448
    assert gabor.texture._target_.endswith("GaborTexture") and gabor.texture.region_size == 112
    assert gabor.selector == {} and gabor.head._target_.endswith("LinearHead")
    both = OmegaConf.to_container(compose("+experiment=cub_glsim_gabor"), resolve=True)
    glsim = OmegaConf.to_container(compose("+experiment=cub"), resolve=True)
    assert both["texture"]["_target_"].endswith("GaborTexture") and glsim["texture"] == {}
    assert {k for k in glsim if glsim[k] != both[k]} == {"name", "texture"}  # GLSim's recipe, plus the branch


@pytest.mark.slow
def test_every_experiment_runs_one_tiny_step(tmp_path, cub_root):
    """Each experiment file with its backbone swapped for a tiny one (CAL's for a tiny CNN, TransFG's
    overlapping patches at a stride under vit_micro's 8 px), on a CUB-layout fixture; one sweep per
    kind, so the process starts three times instead of once per experiment."""
    kinds = {
        "vit": ([e for e in EXPERIMENTS if not e.endswith(("_cal", "_transfg"))],  # 36 patches: dogs_ffvt takes 24
                [*TINY[:4], "data.img_size=48"]),
        "transfg": ([e for e in EXPERIMENTS if e.endswith("_transfg")], [*TINY[:4], "++method.overlap_stride=6"]),
        "cal": ([e for e in EXPERIMENTS if e.endswith("_cal")], ["backbone=resnet_micro", *TINY[1:4]]),
    }
    status = {}
    for kind, (experiments, tiny) in kinds.items():
        sweep = tmp_path / kind
        proc = fgvr("train", "--multirun", f"+experiment={','.join(experiments)}", f"data.root={cub_root}",
                    "data=cub", "data.check_counts=false", *tiny, "backbone.pretrained=false", "trainer.epochs=1",
                    "trainer.limit_train_batches=1", "optim.warmup_steps=0", f"hydra.sweep.dir={sweep}",
                    cwd=tmp_path, timeout=900, check=False)
        assert proc.returncode == 0, (kind, proc.stderr[-3000:])
        for job, experiment in enumerate(experiments):
            run = sweep / str(job)
            assert f"+experiment={experiment}" in (run / ".hydra" / "overrides.yaml").read_text()
            results = json.loads((run / "results.json").read_text())
            status[experiment] = results["status"]
            if results["status"] == "finished":  # one step trained, and the whole test split (6 images) evaluated
                assert (results["steps"], results["test_images"], results["dataset"]) == (1, 6, "cub"), experiment
    assert set(status) == set(EXPERIMENTS) and set(status.values()) == {"finished"}, status


@pytest.mark.slow
def test_paper_table_script(tmp_path, cub_root):
    """scripts/paper_table.sh on one data set with tiny backbones: the six columns x 3 seeds (three calls,
    as CAL needs a CNN and TransFG's overlap a stride under the tiny ViT's patch), then the tables in the
    paper's layout (data sets x methods) and the cost per method."""
    env = {**os.environ, "PATH": f"{FGVR.parent}:{os.environ['PATH']}", "DATASETS": "cub", "OUT": str(tmp_path / "t4")}
    tiny = ["data.check_counts=false", "backbone.pretrained=false", "trainer.epochs=1", "trainer.limit_train_batches=1",
            "optim.warmup_steps=0", *TINY[1:4]]
    for methods, overrides in (("vit ffvt glsim ielt", [TINY[0]]), ("transfg", [TINY[0], "method.overlap_stride=6"]),
                               ("cal", ["backbone=resnet_micro"])):
        proc = subprocess.run([str(REPO / "scripts" / "paper_table.sh"), str(cub_root.parent), *overrides, *tiny],
                              cwd=tmp_path, env=env | {"METHODS": methods}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "t4" / "table4.md").read_text().splitlines()
    # the columns in the paper's order (the sweep dirs are numbered by METHODS' default order), CAL and IELT after
    assert table[0] == ("| dataset | none / none | transfg / none | ffvt / none | none / glsim | cal / none | "
                        "ielt / none |")
    (cub,) = [line for line in table if line.startswith("| cub |")]
    cells = cub.split(" | ")[1:]
    assert all("(3)" in cell for cell in cells), cells
    cost = (tmp_path / "t4" / "cost.md").read_text().splitlines()
    assert cost[0] == "| method / selector | cub | eval_img_per_s | train_img_per_s | cost.gflops_per_image.total |"
    assert (tmp_path / "t4" / "table4.tex").read_text().startswith(r"\begin{tabular}")
    assert (tmp_path / "t4" / "acc_vs_throughput.png").stat().st_size > 0


def test_seed_sweep_script(tmp_path, cub_root):
    script = REPO / "scripts" / "seed_sweep.sh"
    env = {**os.environ, "PATH": f"{FGVR.parent}:{os.environ['PATH']}"}
    proc = subprocess.run([str(script), "cub", str(cub_root), *TINY[:4], "data.check_counts=false",
                           "backbone.pretrained=false", "trainer.epochs=1", "trainer.limit_train_batches=1",
                           "optim.warmup_steps=0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("20*/*_cub")
    assert sorted(json.loads((sweep / str(i) / "results.json").read_text())["seed"] for i in range(3)) == [1, 10, 100]
    usage = subprocess.run([str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr and "cub" in usage.stderr


def test_model_cost_script(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "model_cost.py"), "+experiment=cub",
                           "backbone=vit_micro", "data.img_size=32", "data.batch_size=4"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cost["batch_size"] == 4 and cost["select_ms"] > 0 and cost["gflops_per_image"]["second_pass"] > 0


def test_one_of_several_processes_needs_a_shared_run_dir(tmp_path):
    """Under torchrun (or srun) every rank composes the config: a clock-made run dir would differ."""
    proc = subprocess.run([str(FGVR), "train", *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "WORLD_SIZE": "2", "RANK": "1"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "fgvr train: error: this is one of several processes (torchrun or srun); pass hydra.run.dir=DIR so that "
        "all of them share one run dir")


def test_a_failed_job_is_one_line():
    """submitit's reports, as recorded from the test cluster: a killed job and a job that raised."""
    from fgvr.cli import _job_error

    killed = ("Job 19 (task: 0) with path /s/.submitit/19/19_0_result.pkl\nhas not produced any output (state: "
              "FAILED)\nError stream produced:\n" + "-" * 40 + "\nsrun: error: localhost: task 0: CPU time limit "
              "exceeded\n\n")
    assert _job_error(killed) == ("SLURM job 19 failed (state: FAILED): srun: error: localhost: task 0: CPU time "
                                  "limit exceeded; logs: /s/.submitit/19")
    raised = ("Job (task=0) failed during processing with trace:\n" + "-" * 22 + "\nTraceback (most recent call "
              "last):\n  File \"x.py\", line 1, in f\nValueError: seed=x is not an int\n\n" + "-" * 22 + "\nYou can "
              "check full logs with 'job.stderr(0)' and 'job.stdout(0)'or at paths:\n  - /s/.submitit/20_1/20_1_0_"
              "log.err\n  - /s/.submitit/20_1/20_1_0_log.out")
    assert _job_error(raised) == "SLURM job 20_1 failed: ValueError: seed=x is not an int; logs: /s/.submitit/20_1"


@pytest.mark.slow
def test_selector_benchmark_script(tmp_path):
    """scripts/selector_benchmark.sh on a miniature synth_parts (one seed, one batch a run), with
    the pretrained weights already cached: every sweep runs and the table has a row per backbone and
    selector, texture branch or method."""
    from fgvr.models.backbone import Backbone
    from fgvr.runtime.checkpoint import save_weights

    cache = tmp_path / "cache"
    vit = Backbone("vit_tiny_patch16_224", img_size=64, kwargs=dict(depth=4, embed_dim=96, num_heads=3, patch_size=8))
    save_weights(vit.model.state_dict(), cache / "pretrained" / "vit_micro_synth.safetensors", {})
    env = {**os.environ, "PATH": f"{FGVR.parent}:{os.environ['PATH']}", "SEEDS": "1", "FGVR_CACHE_DIR": str(cache)}
    out = tmp_path / "bench"
    proc = subprocess.run([str(REPO / "scripts" / "selector_benchmark.sh"), str(out), "trainer.epochs=1",
                           "trainer.limit_train_batches=1", "optim.warmup_steps=0", "data.batch_size=8",
                           "data.num_workers=0", "data.synth.train_per_class=4", "data.synth.test_per_class=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == ("| backbone_config / method / selector / texture | synth_parts | crop_iou | crop_hit | token_hit "
                        "| region_iou | train_img_per_s | cost.gflops_per_image.total |")
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table[2:27]]
    selectors = ["none", "oracle (upper bound)", "random", "center", "glsim"]
    vit = [*selectors, "rollout"]
    methods = ["transfg", "ffvt", "ielt"]
    assert rows == ([f"resnet_micro / none / {s} / none" for s in selectors]  # sweep dirs in their names' order
                    + ["resnet_micro / cal / none / none", "resnet_micro / none / none / gabor"]
                    + [f"vit_micro / none / {s} / none" for s in vit] + [f"vit_micro / {m} / none / none" for m in methods]
                    + [f"vit_micro_synth / none / {s} / none" for s in vit]
                    + [f"vit_micro_synth / {m} / none / none" for m in methods])
    assert all(line.endswith("|") and "(1)" in line for line in table[2:27])
    assert not (out / "synth_pretrain").exists()  # the cached weights were reused
