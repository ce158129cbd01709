#!/usr/bin/env bash
# The GLSim paper's Table 4 from scratch: the plain ViT-B/16, TransFG, FFVT and GLSim (plus CAL and
# IELT) on each benchmark over seeds 1, 10 and 100, then the table beside the published numbers.
#   scripts/paper_table.sh DATA_DIR [overrides...]        e.g. hydra/launcher=slurm
# DATA_DIR is the --root of `fgvr data download NAME --root DATA_DIR`. DATASETS picks the data
# sets (default: the six of the paper), OUT where the sweeps go (default: outputs/table4, one
# sweep dir per data set and method, numbered in the paper's order), METHODS the columns (default:
# "vit transfg ffvt glsim cal ielt"; each is the experiment <data set>_<method>, glsim the data
# set's own). Rerunning it resumes the runs that did not finish, and a run with other METHODS (or
# other overrides, e.g. a CNN for cal) adds its runs to the same tables.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR [overrides...]  (DATASETS=\"cub dogs flowers nabirds pets inat2017\" OUT=outputs/table4)" >&2
  exit 2
fi
data_dir=$1
shift
out=${OUT:-outputs/table4}
columns="vit transfg ffvt glsim cal ielt"  # the paper's order, then CAL and IELT
column() {  # a method's place in that order (its sweep dir's number), so the tables keep it
  local i=0 m
  for m in $columns; do
    i=$((i + 1))
    if [ "$m" = "$1" ]; then echo "$i"; return; fi
  done
  echo $((i + 1))
}
for name in ${DATASETS:-cub dogs flowers nabirds pets inat2017}; do
  folder=$(fgvr data list | awk -v name="$name" '$1 == name { print $NF }')
  for m in ${METHODS:-$columns}; do
    experiment=${name}_$m
    [ "$m" = glsim ] && experiment=$name
    fgvr train --multirun "+experiment=$experiment" seed=1,10,100 "data.root=$data_dir/$folder" \
      "hydra.sweep.dir=$out/$name/$(column "$m")_$m" "$@"
  done
done
# The paper's layout (data sets x methods, published numbers beside), then each method's cost.
fgvr table "$out" --rows dataset --cols method,selector --compare paper --out "$out/table4.md"
fgvr table "$out" --rows dataset --cols method,selector --format latex --out "$out/table4.tex"
fgvr table "$out" --rows method,selector --extra eval_img_per_s,train_img_per_s,cost.gflops_per_image.total \
  --plot "$out/acc_vs_throughput.png" --out "$out/cost.md"
cat "$out/table4.md" "$out/cost.md"
