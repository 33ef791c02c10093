#!/usr/bin/env bash
# Multi-node evaluation under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 --cpus-per-task 8 scripts/slurm_evaluate.sh \
#       runs/imagenet/dvce-pairs [--second-classifier ... --resolution 256]
# Your options come first, the SLURM-derived --num-nodes/--devices last (same layout
# rules, per-rank logs and environment as slurm_predict.sh). Evaluation reads the run's
# images, so every node must see the run folder (a shared filesystem, or the folder
# copied to each node). Paths from $SLURM_SUBMIT_DIR. A preempted or failed job is
# requeued (--requeue) and evaluates again from the start: its outputs are renamed
# into place only when complete, so a killed evaluation never passes for one.
#SBATCH --job-name=lit-vce-eval
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --cpus-per-task=8
set -euo pipefail
# sbatch runs a copy of this script from its spool folder: the helper is found in the
# submit folder's scripts/ (or beside this file when run directly)
HELPER=${SLURM_SUBMIT_DIR:-$(pwd)}/scripts/_slurm_layout.sh
[[ -f $HELPER ]] || HELPER=$(dirname "${BASH_SOURCE[0]}")/_slurm_layout.sh
source "$HELPER"
RUN=${1:?usage: slurm_evaluate.sh RUN_DIR [evaluate options...]}
shift
exec ${SRUN:-srun} "${SRUN_OPTS[@]}" "$LIT_VCE" evaluate "$RUN" --num-workers "$WORKERS" "$@" --accelerator gpu \
  --num-nodes "$NODES" --devices "$PER_NODE"
