#!/usr/bin/env bash
# Multi-node predict under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 --cpus-per-task 8 scripts/slurm_predict.sh \
#       --config imagenet/base --config imagenet/methods/dvce --config imagenet/protocols/pairs \
#       --data.root /data/imagenet/val --writer.output_dir runs/imagenet/dvce-pairs
#
# Your arguments win over every --config file wherever they stand (the CLI applies the
# files first). The job's layout comes from SLURM and is given last:
# --trainer.num_nodes (--nodes), --trainer.devices (--ntasks-per-node, or --ntasks
# split evenly over the nodes), --trainer.strategy ddp. --data.num_workers defaults to
# --cpus-per-task minus one (the main process); give it to override. Paths are taken
# from $SLURM_SUBMIT_DIR (the folder sbatch was called in), not the node's cwd.
# Each rank logs to logs/slurm/<job name>-<job id>-rank<N>.out (LIT_VCE_LOG_DIR moves
# them; LIT_VCE_RANK_LOGS=0 keeps one log with lines labelled by rank).
# Preemption: --requeue with --signal=SIGUSR1@90 lets Lightning's auto-requeue
# requeue the job 90 s before its end; the requeued job resumes by sample id (the
# run folder's finished samples are skipped). Without a shared filesystem every node
# keeps its own images under --writer.output_dir; rank 0 gathers all rows by a
# collective (docs/clusters.md). Weights: `lit-vce fetch` with the same arguments on a
# login node first; compute nodes without internet: export LIT_VCE_OFFLINE=1 (and the
# NCCL variables your cluster needs, docs/clusters.md "Environment").
#SBATCH --job-name=lit-vce
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@90
#SBATCH --cpus-per-task=8
set -euo pipefail
# sbatch runs a copy of this script from its spool folder: the helper is found in the
# submit folder's scripts/ (or beside this file when run directly)
HELPER=${SLURM_SUBMIT_DIR:-$(pwd)}/scripts/_slurm_layout.sh
[[ -f $HELPER ]] || HELPER=$(dirname "${BASH_SOURCE[0]}")/_slurm_layout.sh
source "$HELPER"
exec ${SRUN:-srun} "${SRUN_OPTS[@]}" "$LIT_VCE" predict --data.num_workers "$WORKERS" "$@" \
  --trainer.num_nodes "$NODES" --trainer.devices "$PER_NODE" --trainer.strategy ddp
