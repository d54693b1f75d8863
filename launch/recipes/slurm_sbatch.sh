#!/bin/bash
# musenet-pod --recipe=slurm: musenet-train on @nodes node(s) x @gpus_per_node GPU(s), one task (one JAX
# process) per GPU. JAX detects SLURM by itself (--distributed=auto): process count and id come from
# SLURM_NTASKS / SLURM_PROCID, the coordinator is the first node of the job, and each process drives the
# GPU with its node-local rank SLURM_LOCALID. Every task therefore sees all GPUs of its node: do not add
# --gpus-per-task.
# Rendered by launch/pod.py with string.Template using '@@' as the delimiter.
#SBATCH --job-name=@job_name
#SBATCH --nodes=@nodes
#SBATCH --ntasks-per-node=@gpus_per_node
#SBATCH --gpus-per-node=@gpus_per_node
#SBATCH --exclusive
# SIGTERM to every task @grace_s s before the time limit: musenet-train writes a checkpoint and exits 0.
#SBATCH --signal=TERM@@@grace_s
# Requeue after a node failure or preemption, and (below) after a time-limit stop; the log is appended to.
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
@optional_directives
set -u
@activate
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}"
srun --kill-on-bad-exit=1 @train_command
status=$?
# A clean exit before final_metrics.json exists means musenet-train stopped at the SIGTERM above: requeue
# the job (same job id) so that it resumes from the checkpoint, at most @max_requeues times.
if [ "$status" -eq 0 ] && [ ! -e @done_marker ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt @max_requeues ]; then
    echo "not finished: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
  else
    echo "not finished after @max_requeues requeues; resubmit to continue" >&2
    status=1
  fi
fi
exit "$status"
