#!/bin/bash
# Submit a recipe's stages as chained jobs: each stage starts only after the previous one finished
# successfully (--dependency=afterok), from its final weights (the recipe's stages: say so).
#
#   slurm/pipeline.sh RECIPE.yaml STAGE [STAGE ...] [-- sbatch options ...] [--- key=value ...]
#   slurm/pipeline.sh examples/apollomoe-1.5b.yaml cpt sft -- --nodes=4 --partition=gpu
#
# Prints one line per stage: STAGE JOBID. Requeued jobs keep their id, so the chain survives requeues.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 2 ] || { echo "usage: $0 RECIPE.yaml STAGE [STAGE ...] [-- sbatch options] [--- key=value ...]" >&2; exit 2; }
recipe=$1; shift
stages=(); sbatch_opts=(); overrides=()
while [ $# -gt 0 ] && [ "$1" != "--" ] && [ "$1" != "---" ]; do stages+=("$1"); shift; done
if [ "${1:-}" = "--" ]; then shift; while [ $# -gt 0 ] && [ "$1" != "---" ]; do sbatch_opts+=("$1"); shift; done; fi
if [ "${1:-}" = "---" ]; then shift; overrides=("$@"); fi
name=$(basename "$recipe" .yaml)
previous=""
for stage in "${stages[@]}"; do
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency="afterok:$previous" --kill-on-invalid-dep=yes)
  job=$(sbatch --parsable --job-name="medmoe-$name-$stage" "${dependency[@]}" "${sbatch_opts[@]}" \
        "$here/train.sbatch" "$recipe" --stage "$stage" "${overrides[@]}")
  job=${job%%;*}
  echo "$stage $job"
  previous=$job
done
