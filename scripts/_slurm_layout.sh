# Sourced by slurm_predict.sh and slurm_evaluate.sh: the job's layout from SLURM's
# variables, checked, and the srun options shared by both.
#   NODES     --nodes (SLURM_JOB_NUM_NODES)
#   PER_NODE  tasks (= GPUs) per node: --ntasks-per-node, else SLURM's even split of
#             --ntasks over the nodes; an uneven split is refused (Lightning needs the
#             same number of devices on every node)
#   WORKERS   data-loader workers per task: --cpus-per-task minus the main process
#   SRUN_OPTS per-rank log files (LIT_VCE_RANK_LOGS=0: one log, lines labelled by rank)
ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
cd "$ROOT"
LIT_VCE=${LIT_VCE:-$ROOT/.venv/bin/lit-vce}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [[ -n ${SLURM_NTASKS_PER_NODE:-} ]]; then
  PER_NODE=${SLURM_NTASKS_PER_NODE%%(*}          # "4(x2)" -> "4"
elif [[ -n ${SLURM_TASKS_PER_NODE:-} ]]; then   # --ntasks only: how SLURM placed them
  if [[ $SLURM_TASKS_PER_NODE == *,* ]]; then
    echo "error: SLURM placed the ${SLURM_NTASKS:-?} tasks unevenly over the nodes ($SLURM_TASKS_PER_NODE);" \
      "every node needs the same number of GPUs: give --ntasks-per-node (and --nodes)" >&2
    exit 2
  fi
  PER_NODE=${SLURM_TASKS_PER_NODE%%(*}
elif [[ -n ${SLURM_NTASKS:-} ]]; then
  if (( SLURM_NTASKS % NODES )); then
    echo "error: --ntasks $SLURM_NTASKS does not split evenly over $NODES nodes; give --ntasks-per-node" >&2
    exit 2
  fi
  PER_NODE=$(( SLURM_NTASKS / NODES ))
else
  PER_NODE=1
fi
CPUS=${SLURM_CPUS_PER_TASK:-2}
WORKERS=$(( CPUS > 1 ? CPUS - 1 : 0 ))
# Slurm >= 22.05: srun no longer inherits sbatch's --cpus-per-task; without this each
# task may get one CPU and its data-loader workers share it.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
SRUN_OPTS=(--kill-on-bad-exit=1)
if [[ ${LIT_VCE_RANK_LOGS:-1} != 0 ]]; then
  LOG_DIR=${LIT_VCE_LOG_DIR:-$ROOT/logs/slurm}
  mkdir -p "$LOG_DIR"
  SRUN_OPTS+=("--output=$LOG_DIR/%x-%j-rank%t.out")
  echo "lit-vce: $NODES node(s) x $PER_NODE task(s); per-rank logs: $LOG_DIR/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID:-0}-rank<N>.out"
else
  SRUN_OPTS+=(--label)
fi
