#!/usr/bin/env bash
# Multi-node evaluation under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 scripts/slurm_evaluate.sh runs/imagenet/dvce-pairs
# Extra arguments go to `lit-vce evaluate` (e.g. --second-classifier, --resolution 256).
#SBATCH --job-name=lit-vce-eval
#SBATCH --time=04:00:00
set -euo pipefail
RUN=${1:?usage: slurm_evaluate.sh RUN_DIR [evaluate options...]}
shift
NODES=${SLURM_JOB_NUM_NODES:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
srun .venv/bin/lit-vce evaluate "$RUN" --accelerator gpu --num-nodes "$NODES" --devices "$PER_NODE" "$@"
