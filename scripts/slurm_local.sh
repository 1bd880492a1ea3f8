#!/usr/bin/env bash
# A real SLURM cluster of one node on this machine, for testing bir's SLURM launcher
# (hydra-submitit-launcher) without a cluster.
#
#   scripts/slurm_local.sh up       install slurm-wlm + munge where missing (Debian, as root),
#                                   write slurm.conf (one node, 2 CPUs), start munged, slurmctld
#                                   and slurmd, wait until sinfo shows the node idle
#   scripts/slurm_local.sh down     stop the three daemons
#   scripts/slurm_local.sh status   exit 0 when the node answers and is usable
#
# Container-friendly settings: proctrack/linuxproc, task/none, no cgroup plugin, no accounting.
# The configuration is written to /etc/slurm/slurm.conf (where sbatch/sinfo look) only when that
# file is missing or was written by this script: a real cluster's configuration is never touched.
# Exit status 3 from `up` means the packages could not be installed (no apt, not root, no
# network): the tests skip with that message.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARK="# written by bir scripts/slurm_local.sh"
STATE=/var/lib/bir-slurm          # spool, state and logs of this cluster
NODE=$(hostname -s)
CPUS=${BIR_SLURM_CPUS:-2}

log() { echo "slurm_local: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return 0
    fi
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "cannot install slurm-wlm and munge: needs root and apt-get (Debian/Ubuntu)"
        exit 3
    fi
    log "installing slurm-wlm and munge (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends slurm-wlm munge; } >"${TMPDIR:-/tmp}/bir-slurm-apt.log" 2>&1; then
        tail -5 "${TMPDIR:-/tmp}/bir-slurm-apt.log" >&2
        log "apt-get install slurm-wlm munge failed (see ${TMPDIR:-/tmp}/bir-slurm-apt.log)"
        exit 3
    fi
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; leaving it (a real cluster?)"
        return 0
    fi
    # memory the node offers to jobs: what the machine has, less 1 GiB for everything else
    local mem_mb
    mem_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 - 1024}' /proc/meminfo)
    mkdir -p /etc/slurm "$STATE"/ctld "$STATE"/d "$STATE"/log
    cat >"$CONF" <<EOF
$MARK
ClusterName=bir-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups in a container: track processes by parent pid, no task binding or accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
ReturnToService=2
SlurmctldPidFile=/run/bir-slurmctld.pid
SlurmdPidFile=/run/bir-slurmd.pid
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=5
# short: jobs cancelled in tests are gone at once
UnkillableStepTimeout=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -o "%t" 2>/dev/null | head -1; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 status=none
    fi
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE"/munged.ours  # down stops munged only when up started it
}

# pid from a daemon's pid file, when that process is alive
alive_pid() {
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

# sacct needs slurmdbd (a database), which a one-node test cluster does without. submitit asks
# `sacct -o JobID,State,NodeList --parsable2 -j IDS` to learn that a job ended without a result
# (cancelled, killed, failed before Python ran); this stand-in answers from slurmctld's record of
# recent jobs (kept MinJobAge seconds). Put $STATE/bin first on PATH to use it.
write_sacct_shim() {
    mkdir -p "$STATE"/bin
    cat >"$STATE"/bin/sacct <<'SHIM'
#!/usr/bin/env bash
# sacct stand-in of scripts/slurm_local.sh: JobID|State|NodeList of the jobs given with -j.
ids=""
while [ $# -gt 0 ]; do
    case "$1" in
        -j | --jobs) ids=$2; shift ;;
        -j* ) ids=${1#-j} ;;
        --jobs=*) ids=${1#--jobs=} ;;
    esac
    shift
done
echo "JobID|State|NodeList"
for id in ${ids//,/ }; do
    scontrol show job -o "${id%%_*}" 2>/dev/null | while read -r line; do
        declare -A f=()
        for kv in $line; do f[${kv%%=*}]=${kv#*=}; done
        jid=${f[JobId]}
        [ -n "${f[ArrayJobId]:-}" ] && jid="${f[ArrayJobId]}_${f[ArrayTaskId]}"
        echo "$jid|${f[JobState]}|${f[NodeList]}"
    done
done
SHIM
    chmod +x "$STATE"/bin/sacct
}

up() {
    install_packages
    write_conf
    write_sacct_shim
    start_munge
    alive_pid /run/bir-slurmctld.pid >/dev/null || /usr/sbin/slurmctld
    alive_pid /run/bir-slurmd.pid >/dev/null || /usr/sbin/slurmd
    local state=""
    for _ in $(seq 1 60); do
        state=$(node_state)
        case "$state" in
            idle | mix | alloc)
                log "node $NODE is $state; for submitit without slurmdbd: export PATH=$STATE/bin:\$PATH"
                sinfo >&2
                return 0 ;;
            down* | drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    log "node $NODE did not become idle (state: ${state:-no answer}); logs in $STATE/log"
    tail -n 20 "$STATE"/log/*.log >&2 || true
    exit 1
}

# stop the daemon whose pid file is given (by its pid, never by name)
stop_daemon() {
    local pid
    pid=$(alive_pid "$1") || return 0
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.5
    done
    log "process $pid ($1) did not stop"
}

down() {
    if alive_pid /run/bir-slurmctld.pid >/dev/null; then
        scancel --user="$(id -un)" 2>/dev/null || true
    fi
    stop_daemon /run/bir-slurmd.pid
    stop_daemon /run/bir-slurmctld.pid
    if [ -f "$STATE"/munged.ours ]; then
        stop_daemon /run/munge/munged.pid
        rm -f "$STATE"/munged.ours
    fi
    log "stopped"
}

status() {
    case "$(node_state)" in
        idle | mix | alloc) return 0 ;;
        *) return 1 ;;
    esac
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
