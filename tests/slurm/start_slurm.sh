#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the real-SLURM tests (tests/test_slurm.py) and for
# trying the study runner's SLURM path by hand: munge, slurmctld, slurmd and, for sacct, slurmdbd
# with a MariaDB database, all run as root, with one CPU partition (`cpu`, the default) holding this
# node and all its cores.
#
#   tests/slurm/start_slurm.sh          # as root; installs Debian's packages when missing
#   tests/slurm/start_slurm.sh --stop   # stops the SLURM daemons it started
#
# Idempotent: daemons already running on the same configuration are kept (with their jobs); a changed
# configuration restarts them. Configuration, state and logs live in $SEMPAIRS_SLURM_DIR (default
# /var/tmp/sempairs-slurm); nothing is written to /etc/slurm. The last line printed is
# SLURM_CONF=<the configuration>: SLURM's commands need it in their environment.
# Exit status: 0 running, 3 this machine cannot run it (not root, no Debian packages), 1 it failed.
set -euo pipefail

DIR=${SEMPAIRS_SLURM_DIR:-/var/tmp/sempairs-slurm}
export SLURM_CONF=$DIR/slurm.conf
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DAEMONS=(slurmd slurmctld slurmdbd)  # in the order they are stopped

cannot() { echo "cannot run a local SLURM here: $*" >&2; exit 3; }
fail() { echo "error: $*" >&2; exit 1; }
running() { [[ -f $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

stop_daemons() {
    for daemon in "${DAEMONS[@]}"; do
        if running "$daemon"; then
            local pid
            pid=$(cat "$DIR/$daemon.pid")
            kill "$pid"
            # A new daemon cannot bind the port before the old one is gone.
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        fi
        rm -f "$DIR/$daemon.pid"
    done
}

[[ $(id -u) == 0 ]] || cannot "the daemons run as root, and this is uid $(id -u)"

if [[ ${1:-} == --stop ]]; then
    stop_daemons
    exit 0
fi

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    command -v apt-get >/dev/null || cannot "no apt-get to install the Debian packages ${missing[*]}"
    echo "installing ${missing[*]}" >&2
    # The packages' own start scripts are refused where there is no init system; this script starts the daemons.
    if ! log=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" 2>&1); then
        cannot "apt-get could not install ${missing[*]}: $(tail -n 1 <<<"$log")"
    fi
fi

# munge authenticates every message between SLURM's commands and daemons.
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || fail "no /etc/munge/munge.key (the munge package creates it)"
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged || fail "munged did not start: see /var/log/munge/munged.log"
    munge -n </dev/null | unmunge >/dev/null || fail "munge does not authenticate: see /var/log/munge/munged.log"
fi

# The accounting database (slurmdbd connects as root through the local socket).
if ! mysqladmin ping >/dev/null 2>&1; then
    /etc/init.d/mariadb start >/dev/null || fail "MariaDB did not start: see /var/log/mysql/error.log"
fi

mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
node=$(hostname -s)
# The CPUs slurmd finds (nproc would follow OMP_NUM_THREADS, which the tests set to 1).
cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
cat > "$DIR/slurmdbd.conf.new" <<CONF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=sempairs_slurm_accounting
PidFile=$DIR/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
CONF
chmod 600 "$DIR/slurmdbd.conf.new"  # slurmdbd refuses a configuration others can read
# Jobs do not reserve memory here (CR_Core): the node's memory is declared small so that it is never
# more than the machine has, which would keep slurmd from registering.
cat > "$DIR/slurm.conf.new" <<CONF
ClusterName=sempairs
SlurmctldHost=$node(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
# No cgroups: a container may not offer them; processes are tracked by their parent ids.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Pending jobs are looked at every 2 s (default 60 and 30): a requeued job starts again at once.
SchedulerParameters=sched_interval=2,bf_interval=2
MpiDefault=none
ReturnToService=2
# sbatch refuses a job that can never run here (more CPUs than the node has) instead of queueing it.
EnforcePartLimits=ALL
# A requeued or cancelled job gets SIGTERM, then SIGKILL this many seconds later.
KillWait=5
# A requeued job may start again this many seconds later (also the lifetime of a job step's credential;
# default 120).
AuthInfo=cred_expire=10
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1024 State=UNKNOWN
PartitionName=cpu Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

unchanged=1
for conf in slurm.conf slurmdbd.conf; do
    cmp -s "$DIR/$conf.new" "$DIR/$conf" || unchanged=0
done
for daemon in "${DAEMONS[@]}"; do
    running "$daemon" || unchanged=0
done
if ((unchanged)); then
    rm "$DIR"/*.conf.new
else
    stop_daemons
    for conf in slurm.conf slurmdbd.conf; do mv "$DIR/$conf.new" "$DIR/$conf"; done
    slurmdbd || fail "slurmdbd did not start: see $DIR/log/slurmdbd.log"
    for _ in $(seq 50); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx sempairs; then
        sacctmgr -i add cluster sempairs >/dev/null || fail "sacctmgr could not add the cluster: see $DIR/log/slurmdbd.log"
    fi
    # -c: a fresh start forgets the jobs of an earlier configuration.
    slurmctld -c || fail "slurmctld did not start: see $DIR/log/slurmctld.log"
    slurmd || fail "slurmd did not start: see $DIR/log/slurmd.log"
fi

for _ in $(seq 60); do
    state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null || true)
    case $state in
        idle | mixed | allocated | completing) echo "SLURM_CONF=$SLURM_CONF"; exit 0 ;;
        drain* | down*) scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.5
done
fail "node $node is not up (state '${state:-unknown}'): see $DIR/log/slurmctld.log and $DIR/log/slurmd.log"
