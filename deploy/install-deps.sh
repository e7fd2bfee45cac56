#!/usr/bin/env bash
# Installs every Debian package qcal needs to build, test and run.
# Idempotent: safe to run again; does nothing harmful when all is present.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config git
  libopenblas-dev            # sgemm + LAPACK (Cholesky) for the CPU engine
  nlohmann-json3-dev         # JSON
  libhiredis-dev redis-server  # queue + job state
  libboost-dev               # Asio and Beast (header-only): the coordinator's HTTP server
  libcpp-httplib-dev         # REST client (the CLI); the server is on Boost.Beast
  libssl-dev                 # cpp-httplib's pkg-config requires it
  libopenmpi-dev openmpi-bin # multi-rank workers
  libgtest-dev libgmock-dev libbenchmark-dev
  python3                    # small helper scripts (no pip packages needed)
  time                       # /usr/bin/time -v for memory measurements
  wrk                        # HTTP load figures (docs/PERFORMANCE.md)
  curl                       # service tests and demo talk to the REST API
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PKGS[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
