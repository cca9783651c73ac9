#!/usr/bin/env bash
# Stop what cluster_up.sh started, by PID file only (munged stays: other clusters may share it).
DIR=${SLURM_CI_DIR:?set SLURM_CI_DIR}
export SLURM_CONF=$DIR/slurm.conf
scancel --user="$(id -un)" >/dev/null 2>&1 || true
sleep 1
pids=""
for f in "$DIR"/slurmd-*.pid "$DIR"/slurmctld.pid; do
  [ -s "$f" ] && pids="$pids $(cat "$f")"
done
# step daemons of this cluster (their working directory is in our spool) can outlive slurmd
for p in $(pgrep -x slurmstepd || true); do
  case "$(readlink "/proc/$p/cwd" 2>/dev/null)" in "$DIR"/*) pids="$pids $p";; esac
done
# processes of this cluster's jobs that outlived them: proctrack/linuxproc follows the process tree, so a
# child (megatron-core's checkpoint-writer manager) whose rank was killed at a requeue escapes it
cluster=$(sed -n 's/^ClusterName=//p' "$SLURM_CONF")
for f in /proc/[0-9]*/environ; do
  if [ -n "$cluster" ] && grep -qxz "SLURM_CLUSTER_NAME=$cluster" "$f" 2>/dev/null; then
    p=${f#/proc/}; pids="$pids ${p%/environ}"
  fi
done
[ -n "$pids" ] && kill $pids 2>/dev/null
alive=""
for _ in $(seq 50); do
  alive=""
  for p in $pids; do [ -d "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] && alive="$alive $p"; done
  [ -z "$alive" ] && break
  sleep 0.2
done
[ -n "$alive" ] && kill -9 $alive 2>/dev/null
rm -f "$DIR"/*.pid
echo "slurm down:$pids"
