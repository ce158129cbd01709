"""Forward FLOPs per stage and the selector's share of a training step for a composed model, on a
random batch (no data set, no weights needed):

    .venv/bin/python scripts/model_cost.py +experiment=cub backbone.pretrained=false
    .venv/bin/python scripts/model_cost.py selector=glsim head=aggregator data.img_size=96

Prints results.json's `cost` block as JSON."""

import json
import sys

import torch
from hydra import compose, initialize_config_dir

from fgvr.engine.cost import measure_cost
from fgvr.models.model import build_model
from fgvr.runtime.config import config_dir, register_schemas

NUM_CLASSES = 200


def main(overrides: list[str]) -> None:
    register_schemas()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES)
    size, batch = cfg.data.img_size, cfg.data.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (batch,))
    print(json.dumps(measure_cost(model, images, labels, amp=None, reps=3)))


if __name__ == "__main__":
    main(sys.argv[1:])
