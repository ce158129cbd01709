#!/usr/bin/env bash
# The README's figure of `fgvr viz`: a tiny GLSim run on the synthetic set (timm's test_resnet from
# scratch, 4 classes, 64 px, 4 epochs on the CPU: about a minute on 2 cores; a ViT from scratch
# would need far longer to find the part), then `fgvr viz cam=gradcam` of its first val image,
# copied to scripts/readme/viz_gradcam.png.
#   scripts/readme_figures.sh [WORK_DIR]   (the run and its figures; default: a temporary folder, removed)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ $# -gt 0 ]; then
  work=$1
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi

fgvr train backbone=resnet_micro selector=glsim head=aggregator trainer.device=cpu trainer.epochs=4 \
  optim.warmup_steps=5 data.synth.num_classes=4 data.synth.train_per_class=64 data.synth.test_per_class=8 \
  data.batch_size=32 data.num_workers=0 logger=none hydra.run.dir="$work/run"
fgvr viz ckpt="$work/run" split=val n=1 cam=gradcam device=cpu out="$work/viz"
figure=$repo/scripts/readme/viz_gradcam.png
mkdir -p "$(dirname "$figure")"
cp "$work/viz/val_000.png" "$figure.tmp$$" && mv "$figure.tmp$$" "$figure"
echo "wrote $figure"
