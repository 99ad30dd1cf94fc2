#!/usr/bin/env bash
# Set up convsim in ./.venv: the CPU build of torch (pinned: a looser pin pulls a multi-GB CUDA build),
# then the package with its test extras. Quiet: pip's output goes to .venv/setup.log and is shown only when
# a step fails; the last line says what to run next.
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp)
trap 'rm -f "$log"' EXIT

step() {  # run a step with its output in the log; on failure show the log's end and stop
  if ! "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup failed at \`$*\` (the end of its output is above)" >&2
    exit 1
  fi
}

step python3 -m venv .venv
. .venv/bin/activate
step pip install --upgrade pip
step pip install torch==2.13.0
step pip install -e ".[test]"
cp "$log" .venv/setup.log
echo "convsim is installed in .venv (log: .venv/setup.log). Next: . .venv/bin/activate && convsim demo"
