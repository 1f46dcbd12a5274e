#!/usr/bin/env bash
# One virtual environment per peer under .venv-peers/<peer>: their pins (fastapi, uvicorn,
# pydantic, grpcio) conflict with each other and with ours. torch is the same CPU build as ours.
# Usage: bash benchmarks/peers/install.sh [peer ...]   (default: all five)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=.venv-peers
declare -A PACKAGES=(
  [torchserve]="torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml"  # ts imports yaml undeclared
  [pytriton]="nvidia-pytriton==0.7.0"
  [litserve]="litserve==0.2.19"
  [rayserve]="ray[serve]==2.60.0"
  [mlserver]="mlserver==1.7.1"
)
PEERS=("$@")
[ ${#PEERS[@]} -eq 0 ] && PEERS=(torchserve pytriton litserve rayserve mlserver)
for peer in "${PEERS[@]}"; do
  venv="$ROOT/$peer"
  if [ -f "$venv/.installed" ]; then continue; fi
  echo "== $peer"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet torch==2.13.0
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet safetensors numpy requests ${PACKAGES[$peer]}
  touch "$venv/.installed"
done
