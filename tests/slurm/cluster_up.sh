#!/usr/bin/env bash
# A real Slurm (Debian's 22.05) on this one machine for the tests: munged, slurmctld and two slurmd
# "nodes" n1, n2 (2 CPUs each) on loopback. Needs root and Debian's slurmctld slurmd slurm-client munge
# libpmix2 (.ci/run installs them). State under $SLURM_CI_DIR; tear down with cluster_down.sh.
#   SLURM_CI_DIR=/tmp/medmoe-slurm bash tests/slurm/cluster_up.sh && export SLURM_CONF=/tmp/medmoe-slurm/slurm.conf
set -euo pipefail
DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR}
NODES=2
rm -rf "$DIR/state" "$DIR/spool" "$DIR/log"  # a fresh cluster: no jobs from an earlier run
mkdir -p "$DIR"/{state,log}
for i in $(seq 1 $NODES); do mkdir -p "$DIR/spool/n$i" "$DIR/tmp/n$i"; done

# munge: a key once, one daemon (shared with any other cluster on this machine)
[ -s /etc/munge/munge.key ] || { mungekey --create; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

cat > "$DIR/slurm.conf" <<CONF
ClusterName=medmoe-ci
SlurmctldHost=localhost
SlurmctldPort=6817
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again once its old credential expired: 10 s here instead of the default 120 s
AuthInfo=cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
# per-node TmpFS: PMIx puts its step directory there; two virtual nodes sharing /tmp collide
TmpFS=$DIR/tmp/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# no cgroups in containers: track processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName=n[1-$NODES] NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$DIR/slurm.conf
slurmctld -i
for i in $(seq 1 $NODES); do slurmd -N "n$i"; done
st=""
for _ in $(seq 150); do
  st=$(sinfo -h -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$st" = "idle " ] && break
  sleep 0.2
done
[ "$st" = "idle " ] || { echo "slurm nodes not idle: $st" >&2; tail -n 20 "$DIR"/log/*.log >&2; exit 1; }
echo "slurm up: $(sinfo -h -o '%D nodes %T %N')"
