#!/usr/bin/env bash
# Multi-node predict under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 --cpus-per-task 8 scripts/slurm_predict.sh \
#       --config imagenet/base --config imagenet/methods/dvce --config imagenet/protocols/pairs \
#       --data.root /data/imagenet/val --writer.output_dir runs/imagenet/dvce-pairs
#
# Your arguments come first; the SLURM-derived --trainer.num_nodes/devices/strategy
# last, so a later --config cannot reset them. --data.num_workers defaults to
# --cpus-per-task minus one (the main process); give it to override. Paths are taken
# from $SLURM_SUBMIT_DIR (the folder sbatch was called in), not the node's cwd.
# Preemption: --requeue with --signal=SIGUSR1@90 lets Lightning's auto-requeue
# requeue the job 90 s before its end; the requeued job resumes by sample id (the
# run folder's finished samples are skipped). Without a shared filesystem every node
# keeps its own images under --writer.output_dir; rank 0 gathers all rows by a
# collective (README, Clusters). Weights: fetch them before the first launch
# (`lit-vce fetch` with the same arguments, once per node without a shared cache).
#SBATCH --job-name=lit-vce
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@90
#SBATCH --cpus-per-task=8
set -euo pipefail
ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
cd "$ROOT"
LIT_VCE=${LIT_VCE:-$ROOT/.venv/bin/lit-vce}
NODES=${SLURM_JOB_NUM_NODES:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
PER_NODE=${PER_NODE%%(*}            # "4(x2)" -> "4"
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-2} > 1 ? ${SLURM_CPUS_PER_TASK:-2} - 1 : 0 ))
exec ${SRUN:-srun} "$LIT_VCE" predict --data.num_workers "$WORKERS" "$@" \
  --trainer.num_nodes "$NODES" --trainer.devices "$PER_NODE" --trainer.strategy ddp
