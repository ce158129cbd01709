#!/usr/bin/env bash
# The papers' protocol: one experiment over seeds 1, 10 and 100, one run dir per seed.
#   scripts/seed_sweep.sh cub /data/CUB_200_2011 [more overrides, e.g. data.img_size=448]
# Runs land in outputs/multirun/<date>/<time>_<experiment>/{0,1,2}/results.json.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 EXPERIMENT DATA_ROOT [overrides...]  (experiments: $(ls "$(dirname "$0")/../configs/experiment" | sed 's/\.yaml$//' | tr '\n' ' '))" >&2
  exit 2
fi
experiment=$1 root=$2
shift 2
exec fgvr train --multirun "+experiment=$experiment" "data.root=$root" seed=1,10,100 "$@"
