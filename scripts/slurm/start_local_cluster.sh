#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for tests and CI (Debian/Ubuntu, root):
#   scripts/slurm/start_local_cluster.sh      # idempotent; ~10 s when installed, +~30 s to install
#   scripts/slurm/stop_local_cluster.sh
# Installs slurmctld/slurmd/slurm-client/munge with apt when missing, creates a munge key, writes
# /etc/slurm/slurm.conf (one node = this machine, all its CPUs, partition "debug"), starts munged,
# slurmctld and slurmd in the background (logs and PID files under $NEMO_RLHF_SLURM_BASE) and waits
# until the node is idle. Exit codes: 0 ready; 1 failed (logs named); 3 cannot install here
# (not root, or no apt-get) -- the Slurm tests skip on 3 and name the reason.
set -euo pipefail

BASE=${NEMO_RLHF_SLURM_BASE:-/tmp/nemo_rlhf-slurm}
RUN=$BASE/run LOG=$BASE/log STATE=$BASE/state
CONF=/etc/slurm/slurm.conf
NODE=$(hostname -s)
WAIT_S=${NEMO_RLHF_SLURM_WAIT_S:-60}
T0=$(date +%s%N)
say() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[slurm %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*"; }

have_slurm() { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null

if [ "$(id -u)" != 0 ]; then
  echo "start_local_cluster.sh: must run as root (it installs packages and starts daemons)" >&2; exit 3
fi
mkdir -p "$RUN" "$LOG" "$STATE/ctld" "$STATE/d"

# pid_alive PIDFILE COMM -> 0 if the pid in PIDFILE is alive and is COMM
pid_alive() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(cat "$f" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$comm" ]
}

# 1. packages
if ! have_slurm; then
  command -v apt-get >/dev/null || { echo "start_local_cluster.sh: Slurm is not installed and there is no apt-get" >&2; exit 3; }
  say "installing slurmctld slurmd slurm-client munge (log: $BASE/apt.log)"
  export DEBIAN_FRONTEND=noninteractive
  pkgs="slurmctld slurmd slurm-client munge"
  if ! apt-get install -y -q --no-install-recommends $pkgs >"$BASE/apt.log" 2>&1; then
    apt-get update -q >>"$BASE/apt.log" 2>&1 || true
    if ! apt-get install -y -q --no-install-recommends $pkgs >>"$BASE/apt.log" 2>&1; then
      tail -5 "$BASE/apt.log" >&2
      echo "start_local_cluster.sh: apt-get install $pkgs failed (see $BASE/apt.log)" >&2; exit 3
    fi
  fi
  say "installed $(slurmctld -V)"
fi

# 2. munge: key, directories owned by munge, daemon as user munge
mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
[ -s /etc/munge/munge.key ] || { say "creating munge key"; mungekey --create --keyfile=/etc/munge/munge.key; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 0700 /etc/munge /var/log/munge; chmod 0600 /etc/munge/munge.key; chmod 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running"
else
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged </dev/null >"$LOG/munged.stdout" 2>&1
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n | unmunge >/dev/null || { echo "munged failed to start; see /var/log/munge/munged.log" >&2; exit 1; }
  say "munged started"
fi

# 3. slurm.conf (rewritten only when it changes; daemons restarted then)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024*0.85}' /proc/meminfo)
NEW=$(mktemp)
cat >"$NEW" <<CONF
# written by nemo_rlhf scripts/slurm/start_local_cluster.sh: one node on loopback
ClusterName=nemo_rlhf_local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# the default sched_min_interval (2 s) makes back-to-back jobs wait; the main scheduling loop runs
# every sched_interval (default 60 s), which is when a requeued job becomes eligible to start
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000,sched_interval=1
# a requeued job waits until its old credential expires (default 120 s); a job started earlier
# is killed "Job credential revoked"
AuthInfo=cred_expire=15
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
MailProg=/bin/true
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$NEW" "$CONF"; then
  mkdir -p /etc/slurm; install -m 0644 "$NEW" "$CONF"; say "wrote $CONF"
  if pid_alive "$RUN/slurmctld.pid" slurmctld || pid_alive "$RUN/slurmd.pid" slurmd; then
    say "configuration changed: restarting the Slurm daemons"
    "$(dirname "$0")/stop_local_cluster.sh" --keep-munge
  fi
fi
rm -f "$NEW"

# 4. daemons in the foreground mode (-D), detached, output to files
if pid_alive "$RUN/slurmctld.pid" slurmctld; then
  say "slurmctld already running (pid $(cat "$RUN/slurmctld.pid"))"
else
  setsid nohup slurmctld -D </dev/null >>"$LOG/slurmctld.stdout" 2>&1 &
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  say "slurmctld started"
fi
if pid_alive "$RUN/slurmd.pid" slurmd; then
  say "slurmd already running (pid $(cat "$RUN/slurmd.pid"))"
else
  setsid nohup slurmd -D </dev/null >>"$LOG/slurmd.stdout" 2>&1 &
  for _ in $(seq 50); do [ -s "$RUN/slurmd.pid" ] && break; sleep 0.1; done
  say "slurmd started"
fi

# 5. wait until the node takes jobs
st=
for _ in $(seq $((WAIT_S * 4))); do
  st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
  case "$st" in idle|mix|alloc) say "node $NODE is $st: cluster ready"; exit 0;; esac
  sleep 0.25
done
echo "start_local_cluster.sh: node $NODE is not idle after ${WAIT_S}s (state '$st')" >&2
tail -20 "$LOG/slurmctld.log" "$LOG/slurmd.log" >&2 || true
exit 1
