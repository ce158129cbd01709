#!/usr/bin/env bash
# The selector benchmark: which region method helps, and by how much, on data=synth_parts
# (README, "Which region method helps"). Selectors {none, oracle, random, center, glsim,
# rollout} x backbones {vit_micro from scratch, vit_micro_synth (pretrained on a disjoint
# synthetic task), resnet_micro} x seeds, plus the Gabor texture branch on resnet_micro and the
# methods with their own forward (TransFG, FFVT, IELT on the ViTs, CAL on the CNN); then the
# table of test accuracy, crop IoU / hit, token hit, region IoU and train img/s.
#   scripts/selector_benchmark.sh OUT_DIR [overrides for every run, the pretraining too...]
# SEEDS (default 1,10,100) picks the seeds. The pretrained weights are made once (a few minutes)
# into ${FGVR_CACHE_DIR:-~/.cache/fgvr}/pretrained/vit_micro_synth.safetensors and reused.
# On 2 CPU cores the whole benchmark takes about two hours.
set -euo pipefail
if [ $# -lt 1 ] || [[ $1 == *=* ]]; then
  echo "usage: $0 OUT_DIR [overrides...]  (e.g. $0 outputs/selector_benchmark trainer.device=cuda)" >&2
  exit 2
fi
out=$1
shift
seeds=${SEEDS:-1,10,100}
weights=${FGVR_CACHE_DIR:-$HOME/.cache/fgvr}/pretrained/vit_micro_synth.safetensors

if [ ! -f "$weights" ]; then
  fgvr train +experiment=synth_pretrain hydra.run.dir="$out/synth_pretrain" "$@"
  mkdir -p "$(dirname "$weights")"
  cp "$out/synth_pretrain/backbone.safetensors" "$weights.tmp$$" && mv "$weights.tmp$$" "$weights"
fi

sweep() {  # a sweep dir under $out, then the overrides
  local dir=$1
  shift
  fgvr train --multirun +experiment=synth_parts "seed=$seeds" hydra.sweep.dir="$out/$dir" "$@"
}
sweep vit_micro backbone=vit_micro selector=none,oracle,random,center,glsim,rollout "$@"
sweep vit_micro_synth backbone=vit_micro_synth backbone.checkpoint="$weights" \
  selector=none,oracle,random,center,glsim,rollout "$@"
sweep resnet_micro backbone=resnet_micro selector=none,oracle,random,center,glsim "$@"  # rollout needs a ViT
sweep resnet_micro_gabor backbone=resnet_micro texture=gabor "$@"
sweep vit_micro_methods backbone=vit_micro method=transfg,ffvt,ielt "$@"
sweep vit_micro_synth_methods backbone=vit_micro_synth backbone.checkpoint="$weights" method=transfg,ffvt,ielt "$@"
sweep resnet_micro_cal backbone=resnet_micro method=cal "$@"

fgvr table "$out" --rows backbone_config,method,selector,texture \
  --extra crop_iou,crop_hit,token_hit,region_iou,train_img_per_s,cost.gflops_per_image.total \
  --out "$out/table.md"
cat "$out/table.md"
