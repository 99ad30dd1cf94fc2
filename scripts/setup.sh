#!/usr/bin/env bash
# Set up convsim in ./.venv: the CPU build of torch (pinned: a looser pin pulls a multi-GB CUDA build),
# then the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[test]"
