#!/usr/bin/env bash
# Multi-node predict under SLURM: one task per GPU; Lightning reads SLURM_NTASKS etc.
#   sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 scripts/slurm_predict.sh configs/imagenet/base.yaml \
#       --config configs/imagenet/methods/dvce.yaml --config configs/imagenet/protocols/pairs.yaml \
#       --data.root /data/imagenet/val --writer.output_dir runs/imagenet/dvce-pairs
# Fetch weights once before launching (ranks other than 0 never download).
#SBATCH --job-name=lit-vce
#SBATCH --time=24:00:00
set -euo pipefail
CONFIG=${1:?usage: slurm_predict.sh CONFIG [overrides...]}
shift
NODES=${SLURM_JOB_NUM_NODES:-1}
PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
srun .venv/bin/lit-vce predict --config "$CONFIG" \
  --trainer.num_nodes "$NODES" --trainer.devices "$PER_NODE" --trainer.strategy ddp "$@"
