#!/usr/bin/env bash
# The GLSim paper's Table 4 from scratch: GLSim and the plain ViT-B/16 on each benchmark over
# seeds 1, 10 and 100, then the table beside the published numbers.
#   scripts/paper_table.sh DATA_DIR [overrides...]        e.g. hydra/launcher=slurm
# DATA_DIR is the --root of `fgvr data download NAME --root DATA_DIR`. DATASETS picks the data
# sets (default: the six of the paper), OUT where the sweeps go (default: outputs/table4, one
# sweep dir per data set). Rerunning it resumes the runs that did not finish.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR [overrides...]  (DATASETS=\"cub dogs flowers nabirds pets inat2017\" OUT=outputs/table4)" >&2
  exit 2
fi
data_dir=$1
shift
out=${OUT:-outputs/table4}
for name in ${DATASETS:-cub dogs flowers nabirds pets inat2017}; do
  folder=$(fgvr data list | awk -v name="$name" '$1 == name { print $NF }')
  fgvr train --multirun "+experiment=$name,${name}_vit" seed=1,10,100 "data.root=$data_dir/$folder" \
    "hydra.sweep.dir=$out/$name" "$@"
done
fgvr table "$out" --rows selector --compare paper --extra eval_img_per_s,cost.gflops_per_image.total \
  --plot "$out/acc_vs_throughput.png" --out "$out/table4.md"
fgvr table "$out" --rows selector --extra eval_img_per_s --format latex --out "$out/table4.tex"
cat "$out/table4.md"
