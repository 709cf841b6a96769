#!/bin/bash
# Pretrain with vlp on Slurm:   sbatch slurm/pretrain.sh recipes/local_mi.yaml [--set key=value ...]
#
# Adapt to your cluster by editing the #SBATCH lines or overriding them on the command line
# (sbatch options given before the script win), e.g.
#   sbatch --nodes=4 --ntasks-per-node=8 --gres=gpu:8 --partition=gpu --account=myproj \
#          slurm/pretrain.sh recipes/local_mi.yaml
# One task per GPU: keep --ntasks-per-node equal to the GPUs per node (--gres=gpu:N).
# The job checkpoints on SIGUSR1 (sent 120 s before the time limit or on preemption), exits
# and requeues itself; the requeued job resumes from the newest completed step-N/ folder.
#
#SBATCH --job-name=vlp-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
## On a GPU cluster also set, for example:
## #SBATCH --gres=gpu:1
## #SBATCH --partition=gpu

set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: sbatch slurm/pretrain.sh RECIPE.yaml [vlp pretrain options]" >&2
  exit 2
fi

# The process group is formed from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the master is
# the first host of SLURM_JOB_NODELIST and the port is derived from the job id.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
VLP=${VLP:-vlp}

# srun starts one `vlp pretrain` per task; --resume auto continues after a requeue.
srun --kill-on-bad-exit=1 $VLP pretrain "$@" --resume auto
