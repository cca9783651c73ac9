#!/usr/bin/env bash
# Debian packages for the launch tests: Slurm 22.05 (controller, node daemon, client), munge, PMIx, Open MPI.
set -euo pipefail
pkgs="slurmctld slurmd slurm-client munge libpmix2 openmpi-bin libopenmpi-dev"
# shellcheck disable=SC2086
if ! dpkg -s $pkgs >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
echo "slurm and open mpi packages present"
