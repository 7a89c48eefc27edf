#!/usr/bin/env bash
# A real Slurm for the tests (Debian's slurmctld/slurmd/munge), all state under one folder.
#   bash slurm/cluster.sh start [DIR]   installs the packages if missing, starts munged, slurmctld and one
#                                       slurmd per node, waits until the nodes are idle; prints the
#                                       SLURM_CONF to export
#   bash slurm/cluster.sh stop [DIR]
# DIR defaults to /tmp/qhm-slurm. Tests find the cluster through $DIR/slurm.conf.
# QHM_SLURM_NODES=2 (the default) makes two nodes, n1 and n2, on this one machine: two slurmd daemons
# with their own Port=, spool, pid and log files (%n), and "127.0.0.1 n1 n2" in /etc/hosts (written when
# missing, which needs root) so a multi-node job's rendezvous on its first node resolves.
# QHM_SLURM_NODES=1 makes the one node this host.
set -euo pipefail
cmd=${1:-start}
DIR=${2:-${QHM_SLURM_DIR:-/tmp/qhm-slurm}}
NODES=${QHM_SLURM_NODES:-2}
HOST=$(hostname)

stop() {
    for pidfile in "$DIR"/slurmd*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
        if [ -f "$pidfile" ]; then kill "$(cat "$pidfile")" 2>/dev/null || true; fi
    done
    sleep 1
}

if [ "$cmd" = stop ]; then stop; exit 0; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq munge slurmctld slurmd slurm-client >/dev/null
fi

stop
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
[ -f "$DIR/munge.key" ] || mungekey -c -k "$DIR/munge.key" 2>/dev/null || \
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 2>/dev/null
chmod 600 "$DIR/munge.key"
munged -S "$DIR/munge.socket" --key-file "$DIR/munge.key" --pid-file "$DIR/munged.pid" \
       --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge.seed" -f 2>/dev/null || \
munged -S "$DIR/munge.socket" --key-file "$DIR/munge.key" --pid-file "$DIR/munged.pid" \
       --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge.seed"

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 / NODES ))
if [ "$NODES" = 1 ]; then
    NAMES="$HOST"
    NODE_LINES="NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
else
    NAMES=$(seq -s, -f "n%g" 1 "$NODES")
    NODE_LINES=$(for i in $(seq 1 "$NODES"); do
        echo "NodeName=n$i NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=$((17000 + i)) CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN"
    done)
    if ! getent hosts n1 >/dev/null 2>&1; then
        echo "127.0.0.1 $(seq -s' ' -f 'n%g' 1 "$NODES")" >> /etc/hosts
    fi
fi
cat > "$DIR/slurm.conf" <<CONF
ClusterName=qhm
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=bf_interval=2,sched_interval=2,sched_min_interval=0
MpiDefault=none
${NODE_LINES}
PartitionName=debug Nodes=${NAMES} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
slurmctld -i -f "$SLURM_CONF"
for name in ${NAMES//,/ }; do
    mkdir -p "$DIR/spool/$name"
    slurmd -N "$name" -f "$SLURM_CONF"
done
for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o %t 2>/dev/null | grep -c idle)" = "$NODES" ]; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm did not come up; logs in $DIR/log" >&2
tail -n 20 "$DIR/log/"*.log >&2 || true
exit 1
