#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on this machine, for tests/test_slurm.py (and by hand).
#
#   bash tests/slurm/cluster.sh start DIR   # installs slurm-wlm + munge if missing, starts munged, slurmctld, slurmd
#   bash tests/slurm/cluster.sh stop DIR    # stops them (also after a failed start)
#
# Everything lives under DIR (state, spool, logs, munge key and socket) except the config: it is written to
# Slurm's default path /etc/slurm/slurm.conf (+ gres.conf), because the Snakemake jobstep plugin strips every
# SLURM_* variable (SLURM_CONF too) from the environment of the `srun` it runs inside each job, so a config
# elsewhere is not found there (as on a real cluster, where it sits at the default path). An existing
# /etc/slurm/slurm.conf that is not ours is left alone: the start fails. Loopback only: the node is
# `hostname -s` at 127.0.0.1, and the daemons listen on the ports below. No accounting (slurmdbd): the
# Snakemake plugin then needs `--slurm-status-command squeue` (tests/slurm/profile, not the user profile).
#
# The node declares what workflow/profiles/slurm asks of a job (cpus_per_gpu 8, mem_mb 32000, one GPU for the training
# rules), with SlurmdParameters=config_overrides so slurmd does not drain a smaller machine: the user-facing
# profile is tested unchanged. The GPU is a count-only GRES (no device file): `--gpus=1` is scheduled like on
# a real one-GPU node (GPU jobs run one at a time), while the smoke config itself runs on the CPU. Needs root.
set -euo pipefail

cmd=${1:?usage: cluster.sh start|stop DIR}
dir=${2:?usage: cluster.sh start|stop DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
conf_dir=${ZSQ_SLURM_CONF_DIR:-/etc/slurm}
export SLURM_CONF="$conf_dir/slurm.conf"
marker="# zsqpipe test cluster (tests/slurm/cluster.sh)"
ctld_port=${ZSQ_SLURMCTLD_PORT:-6817}
slurmd_port=${ZSQ_SLURMD_PORT:-6818}

stop() {
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munged.pid"; do
    if [ -f "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
      rm -f "$pidfile"
    fi
  done
  if [ -f "$SLURM_CONF" ] && head -1 "$SLURM_CONF" | grep -qF "$marker"; then
    rm -f "$SLURM_CONF" "$conf_dir/gres.conf"
  fi
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
     && command -v sbatch >/dev/null; then
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "cluster.sh: error: slurm-wlm and munge are not installed and this is not root" >&2
    exit 1
  fi
  echo "cluster.sh: installing Debian packages slurm-wlm munge"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

start() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "cluster.sh: error: the test cluster runs its daemons as root" >&2
    exit 1
  fi
  install_if_missing
  stop
  host=$(hostname -s)
  rm -rf "$dir/state" "$dir/spool" "$dir"/*.log  # a fresh cluster every start (no drained node recovered)
  mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
  # munge: a private key and socket under DIR
  if [ ! -f "$dir/munge/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 700 "$dir/munge"
  chmod 400 "$dir/munge/munge.key"
  munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed"

  if [ -f "$SLURM_CONF" ]; then
    echo "cluster.sh: error: $SLURM_CONF exists and is not this test cluster's; not overwriting it" >&2
    exit 1
  fi
  mkdir -p "$conf_dir"
  cat >"$SLURM_CONF" <<EOF
$marker
ClusterName=zsqtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 NodeHostname=$host CPUs=16 RealMemory=65536 Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$host MaxTime=INFINITE State=UP
EOF
  cat >"$conf_dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=/dev/null Count=1
EOF

  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF"
  # wait until the node is idle (slurmd registered with slurmctld)
  for _ in $(seq 60); do
    state=$(sinfo -h -n "$host" -o '%T' 2>/dev/null | head -1 || true)
    case "$state" in
      idle*) echo "cluster.sh: cluster up (node $host, SLURM_CONF=$SLURM_CONF)"; return 0 ;;
    esac
    sleep 1
  done
  echo "cluster.sh: error: node $host did not become idle (state '${state:-none}'); logs in $dir" >&2
  tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2 || true
  stop
  exit 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: cluster.sh start|stop DIR" >&2; exit 2 ;;
esac
