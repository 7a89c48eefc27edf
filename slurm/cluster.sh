#!/usr/bin/env bash
# A real one-node Slurm for the tests (Debian's slurmctld/slurmd/munge), all state under one folder.
#   bash slurm/cluster.sh start [DIR]   installs the packages if missing, starts munged, slurmctld, slurmd,
#                                       waits until the node is idle; prints the SLURM_CONF to export
#   bash slurm/cluster.sh stop [DIR]
# DIR defaults to /tmp/qhm-slurm. Tests find the cluster through $DIR/slurm.conf.
set -euo pipefail
cmd=${1:-start}
DIR=${2:-${QHM_SLURM_DIR:-/tmp/qhm-slurm}}
HOST=$(hostname)

stop() {
    for d in slurmd slurmctld munged; do
        if [ -f "$DIR/$d.pid" ]; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; fi
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
MEM=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
cat > "$DIR/slurm.conf" <<CONF
ClusterName=qhm
SlurmctldHost=${HOST}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
AuthInfo=socket=$DIR/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
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
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$DIR/slurm.conf"
slurmctld -i -f "$SLURM_CONF"
slurmd -N "$HOST" -f "$SLURM_CONF"
for _ in $(seq 1 60); do
    if sinfo -h -o %t 2>/dev/null | grep -q idle; then
        echo "export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 0.5
done
echo "slurm did not come up; logs in $DIR/log" >&2
tail -n 20 "$DIR/log/"*.log >&2 || true
exit 1
