"""fgvr against the standard alternatives, side by side on this machine, on generated CUB-like JPEGs:

    .venv/bin/python scripts/bench_baselines.py data [--size 448] [--images 200] [--source 1000x750]
        one core: PIL decode + torchvision transforms vs fgvr's OpenCV + albumentations pipeline,
        decoding in full (as before reduced-scale decoding), at reduced scale where that covers
        the resize (its default), and with data.cache=decoded (the same resize, random crop and flip)
    .venv/bin/python scripts/bench_baselines.py timm [--model vit_tiny_patch16_224] [--size 224] [--batch 32]
        training img/s of a loop built from timm's own parts as its train.py builds them (timm's
        loader, PIL transforms and prefetcher, create_optimizer_v2, label-smoothing loss) vs
        `fgvr bench` and `fgvr train` with the same model, batch, precision (fp32) and workers
    .venv/bin/python scripts/bench_baselines.py glsim [--reps 6] [overrides ...]
        training steps of the plain model and of its GLSim twin (selector=glsim head=aggregator)
        on one resident batch, interleaved so that a drifting machine slows both alike: the
        throughput ratio against the ratio of their forward FLOPs

Prints one JSON object per line of results."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FGVR = Path(sys.executable).with_name("fgvr")


def write_jpegs(root: Path, n: int, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """`n` photo-like JPEGs (smooth colour fields, edges, fine texture, noise; CUB's 500 x ~375 px at
    quality 90) in root/{train,test}/<class>/, the layout of data=folder and timm's ImageFolder."""
    import cv2

    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        field = cv2.resize(rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        yy, xx = np.mgrid[0:h, 0:w]
        texture = 25 * np.sin(xx * rng.uniform(0.05, 0.4) + yy * rng.uniform(0.05, 0.4))[..., None]
        image = np.clip(field + texture + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        cv2.circle(image, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(20, 120)),
                   tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
        folder = root / ("test" if i % 5 == 4 else "train") / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:05d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return root


def _rates(pipelines: dict, n: int, repeats: int = 3) -> dict[str, float]:
    """Images per second of each pipeline (a function of the image's index) over n images, the best of
    `repeats` passes, the pipelines' passes interleaved so that a drifting machine slows them alike."""
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            for i in range(n):
                fn(i)
            best[name] = max(best[name], n / (time.perf_counter() - start))
    return best


def bench_data(args) -> None:
    import cv2
    import torch
    import torchvision.transforms as T
    from PIL import Image

    from fgvr.data.cache import decoded_cache
    from fgvr.data.dataset import ImageDataset
    from fgvr.data.readers import make_records
    from fgvr.data.transforms import train_transform
    from fgvr.runtime.config import AugmentConfig

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    w, h = args.source
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images, size=(w, h))
        paths = sorted(str(p) for p in root.rglob("*.jpg"))
        records = make_records(paths, [0] * len(paths))
        resize = round(args.size * 1.34)
        tv = T.Compose([T.Resize((resize, resize)), T.RandomCrop(args.size), T.RandomHorizontalFlip(), T.PILToTensor()])
        aug = AugmentConfig(hflip=True)
        full = ImageDataset(records, train_transform(args.size, 1.34, aug), reduced=False)
        reduced = ImageDataset(records, train_transform(args.size, 1.34, aug))
        cache = decoded_cache(records, resize, Path(tmp) / "cache", "train", workers=0, skip_bad=False)
        cached = ImageDataset(records, train_transform(args.size, 1.34, aug, resized=True), decoded=cache)
        rates = _rates({"pil+torchvision": lambda i: tv(Image.open(paths[i]).convert("RGB")),
                        "fgvr, full decode": full.__getitem__, "fgvr": reduced.__getitem__,
                        "fgvr cache=decoded": cached.__getitem__}, len(paths))
    for name, rate in rates.items():
        print(json.dumps({"bench": "data", "pipeline": name, "size": args.size, "source": f"{w}x{h}",
                          "images": len(paths), "img_per_s_per_core": round(rate, 1),
                          "x_pil": round(rate / rates["pil+torchvision"], 2)}))


def bench_timm(args) -> None:
    import timm
    import timm.data
    import timm.loss
    import timm.optim
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp) / "jpegs", args.images)
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, num_classes=4, img_size=args.size)
        cfg = timm.data.resolve_data_config({}, model=model)
        dataset = timm.data.create_dataset("", root=str(root / "train"), is_training=True)
        loader = timm.data.create_loader(
            dataset, input_size=(3, args.size, args.size), batch_size=args.batch, is_training=True,
            use_prefetcher=True, device=torch.device("cpu"), num_workers=args.workers, mean=cfg["mean"],
            std=cfg["std"], interpolation=cfg["interpolation"], color_jitter=0.4, persistent_workers=True)
        optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
        loss_fn = timm.loss.LabelSmoothingCrossEntropy(smoothing=0.1)
        model.train()

        def batches():
            while True:
                yield from loader

        stream = batches()

        def step() -> None:
            images, target = next(stream)
            loss = loss_fn(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        timm_rate = args.batch * args.steps / (time.perf_counter() - start)
        print(json.dumps({"bench": "timm", "runner": "timm loop", "model": args.model, "size": args.size,
                          "batch": args.batch, "workers": args.workers, "img_per_s": round(timm_rate, 2)}))

        common = ["data=folder", f"data.root={root}", "backbone=vit_tiny", f"backbone.name={args.model}",
                  "backbone.pretrained=false", "backbone.drop_path_rate=0", f"data.img_size={args.size}",
                  f"data.batch_size={args.batch}", f"data.num_workers={args.workers}", "trainer.precision=fp32",
                  "data.val_fraction=0", "trainer.label_smoothing=0.1", "optim.warmup_steps=0"]
        out = Path(tmp) / "bench.json"
        env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
        subprocess.run([str(FGVR), "bench", *common, f"bench.warmup={args.warmup}", f"bench.steps={args.steps}",
                        "bench.eval_steps=1", f"bench.out={out}", f"hydra.run.dir={tmp}/bench"], check=True, env=env)
        bench = json.loads(out.read_text())
        print(json.dumps({"bench": "timm", "runner": "fgvr bench", "img_per_s": bench["train_img_per_s"],
                          "model_img_per_s": bench["model_train_img_per_s"],
                          "x_timm": round(bench["train_img_per_s"] / timm_rate, 3)}))
        if args.train_epochs:
            subprocess.run([str(FGVR), "train", *common, f"trainer.epochs={args.train_epochs}",
                            "trainer.log_every=1000", f"hydra.run.dir={tmp}/train"], check=True, env=env)
            results = json.loads((Path(tmp) / "train" / "results.json").read_text())
            print(json.dumps({"bench": "timm", "runner": "fgvr train", "img_per_s": results["train_img_per_s"],
                              "data_wait_pct": results["data_wait_pct"],
                              "x_timm": round(results["train_img_per_s"] / timm_rate, 3)}))


def bench_glsim(args) -> None:
    import statistics

    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir

    from fgvr.engine.cost import stage_flops
    from fgvr.engine.optim import build_optimizer
    from fgvr.models.model import build_model
    from fgvr.runtime.config import config_dir, register_schemas

    register_schemas()
    models = {}
    for name, extra in (("plain", []), ("glsim", ["selector=glsim", "head=aggregator"])):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("train", overrides=[*args.overrides, *extra])
        torch.manual_seed(0)
        model = build_model(cfg, 200)
        models[name] = (model, build_optimizer(model, cfg.optim, torch.device("cpu"), cfg.optim.lr))
    size, batch = cfg.data.img_size, cfg.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, 200, (batch,))

    def step(model, optimizer) -> float:
        start = time.perf_counter()
        F.cross_entropy(model(images)[0], labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {name: [] for name in models}
    for rep in range(args.reps + 1):  # the first round warms up
        for name, (model, optimizer) in models.items():
            model.train()
            seconds = step(model, optimizer)
            if rep:
                times[name].append(seconds)
    flops = {name: stage_flops(model, images[:1])["total"] for name, (model, _) in models.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"bench": "glsim", "overrides": args.overrides, "batch": batch, "size": size,
                      "plain_img_per_s": round(batch / median["plain"], 2),
                      "glsim_img_per_s": round(batch / median["glsim"], 2),
                      "time_ratio": round(median["glsim"] / median["plain"], 3),
                      "flop_ratio": round(flops["glsim"] / flops["plain"], 3)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    data = sub.add_parser("data", help="data pipelines, one core")
    data.add_argument("--size", type=int, default=448)
    data.add_argument("--images", type=int, default=200)
    data.add_argument("--source", type=lambda s: tuple(map(int, s.split("x"))), default=(500, 375),
                      help="the generated JPEGs' size, WxH")
    t = sub.add_parser("timm", help="training img/s against a loop of timm's parts")
    t.add_argument("--model", default="vit_tiny_patch16_224")
    t.add_argument("--size", type=int, default=224)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--images", type=int, default=400, help="generated JPEGs, 4 in 5 for training")
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--train-epochs", type=int, default=3, help="also time `fgvr train` over this many epochs (0: no)")
    g = sub.add_parser("glsim", help="GLSim's step time against the plain model's, and their FLOP ratio")
    g.add_argument("--reps", type=int, default=6)
    g.add_argument("overrides", nargs="*", default=["backbone=vit_tiny", "backbone.pretrained=false",
                                                    "data.img_size=224", "data.batch_size=32"])
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    {"data": bench_data, "timm": bench_timm, "glsim": bench_glsim}[args.what](args)


if __name__ == "__main__":
    main()
