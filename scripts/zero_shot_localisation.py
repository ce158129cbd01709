"""How well a backbone's own features localise, before any fine-tuning: the selector's box of
every test image of a composed config, scored against the ground-truth boxes (crop IoU and hit,
as `fgvr train` reports them), beside random boxes of the same top_k:

    .venv/bin/python scripts/zero_shot_localisation.py +experiment=synth_parts backbone=vit_micro_synth \
        selector=glsim

Use it on a pretrained checkpoint before a sweep: GLSim's crop is only as good as the CLS-patch
similarity of the features it starts from. Prints JSON."""

import json
import sys

import torch
from hydra import compose, initialize_config_dir

from fgvr.data.dataset import build_loaders
from fgvr.models.model import build_model, source_scale
from fgvr.models.selectors import RandomSelector, localisation
from fgvr.runtime.config import config_dir, register_schemas


@torch.no_grad()
def main(overrides: list[str]) -> None:
    register_schemas()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(cfg.seed)
    loaders = build_loaders(cfg.data, cfg.paths.cache_dir, cfg.seed, pin_memory=False, scale=source_scale(cfg),
                            yield_cores=True)
    model = build_model(cfg, len(loaders.classes)).eval()
    if model.selector is None:
        raise SystemExit("zero_shot_localisation: choose a selector (selector=glsim, rollout, ...)")
    baseline = RandomSelector(top_k=model.selector.top_k, box_end=model.selector.box_end)
    totals = {"selector": torch.zeros(3), "random": torch.zeros(3)}
    for batch in loaders.test:
        _, x = model.prepare(batch.images)
        tokens = model.first_pass(x)
        truth = batch.boxes * model.input_size
        for name, selector in (("selector", model.selector), ("random", baseline)):
            totals[name] += localisation(selector(tokens, x.shape[-2:], batch.boxes).boxes, truth)
    print(json.dumps({name: {"crop_iou": iou / n, "crop_hit": 100 * hit / n, "images": int(n)}
                      for name, (iou, hit, n) in ((k, v.tolist()) for k, v in totals.items())}))


if __name__ == "__main__":
    main(sys.argv[1:])
