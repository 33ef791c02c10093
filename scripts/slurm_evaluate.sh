#!/usr/bin/env bash
# Multi-node evaluation under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 --cpus-per-task 8 scripts/slurm_evaluate.sh \
#       runs/imagenet/dvce-pairs [--second-classifier ... --resolution 256]
# Your options come first, the SLURM-derived --num-nodes/--devices last. Evaluation
# reads the run's images, so every node must see the run folder (a shared
# filesystem, or the folder copied to each node). Paths from $SLURM_SUBMIT_DIR.
#SBATCH --job-name=lit-vce-eval
#SBATCH --time=04:00:00
#SBATCH --cpus-per-task=8
set -euo pipefail
ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
cd "$ROOT"
LIT_VCE=${LIT_VCE:-$ROOT/.venv/bin/lit-vce}
RUN=${1:?usage: slurm_evaluate.sh RUN_DIR [evaluate options...]}
shift
NODES=${SLURM_JOB_NUM_NODES:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
PER_NODE=${PER_NODE%%(*}
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 ))
exec ${SRUN:-srun} "$LIT_VCE" evaluate "$RUN" --num-workers "$WORKERS" "$@" --accelerator gpu --num-nodes "$NODES" \
  --devices "$PER_NODE"
