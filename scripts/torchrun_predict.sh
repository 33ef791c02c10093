#!/usr/bin/env bash
# Multi-GPU / multi-node predict without SLURM, launched by torchrun (run it on every node):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC_PER_NODE=4 scripts/torchrun_predict.sh \
#       --config imagenet/base --config imagenet/methods/dvce --config imagenet/protocols/pairs \
#       --data.root /data/imagenet/val --writer.output_dir runs/imagenet/dvce-pairs
#   (and NODE_RANK=1 on the second node)
#
# One node (NNODES=1, the default) needs nothing else: torchrun's --standalone picks a
# free port. NPROC_PER_NODE defaults to the GPUs nvidia-smi lists (1 without it). As
# with slurm_predict.sh, your arguments win over every --config file, the layout
# (--trainer.num_nodes/devices/strategy) comes last, and --data.num_workers defaults to
# the node's CPUs per process minus one. Each rank's output goes to
# logs/torchrun/<run id>/attempt_<k>/<rank>/{stdout,stderr}.log (LIT_VCE_LOG_DIR moves
# it). Resume, locks and exact metrics are those of any DDP run (docs/clusters.md).
set -euo pipefail
ROOT=${LIT_VCE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
NNODES=${NNODES:-1}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  (( NPROC_PER_NODE > 0 )) || NPROC_PER_NODE=1
fi
CPUS=$(nproc)
WORKERS=$(( CPUS / NPROC_PER_NODE > 1 ? CPUS / NPROC_PER_NODE - 1 : 0 ))
LOG_DIR=${LIT_VCE_LOG_DIR:-$(pwd)/logs/torchrun}
if (( NNODES == 1 )); then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on each node}"
        --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR (node 0)}:${MASTER_PORT:-29500}")
fi
echo "lit-vce: $NNODES node(s) x $NPROC_PER_NODE process(es); per-rank logs under $LOG_DIR"
exec "$PYTHON" -m torch.distributed.run "${RDZV[@]}" --nproc-per-node "$NPROC_PER_NODE" --log-dir "$LOG_DIR" \
  --redirects 3 -m lit_vce.cli predict --data.num_workers "$WORKERS" "$@" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC_PER_NODE" --trainer.strategy ddp
