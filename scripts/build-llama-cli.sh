#!/usr/bin/env bash
# Build llama.cpp's `llama-cli` from the source that the pinned llama-cpp-python vendors, once, and print the
# binary's path (for CONVSIM_LLAMA_CLI: tests/real/test_real_cvec.py runs it with a control vector).
# The binary is cached under $CONVSIM_LLAMA_CLI_CACHE (default ~/.cache/convsim/llama-cli), one folder per
# llama-cpp-python version; a second call only prints the path. Needs pip, cmake, a C++ compiler.
#   export CONVSIM_LLAMA_CLI=$(bash scripts/build-llama-cli.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml | head -n 1 | cut -d= -f3)
[ -n "$version" ] || { echo "error: no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
dest="${CONVSIM_LLAMA_CLI_CACHE:-$HOME/.cache/convsim/llama-cli}/$version"
if [ -x "$dest/llama-cli" ]; then
  echo "$dest/llama-cli"
  exit 0
fi
command -v cmake >/dev/null || pip install -q cmake >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# static (no libllama.so beside it), portable (no -march=native), only the one target
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$work/build" --target llama-cli -j "$(nproc)" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-cli" "$dest/llama-cli.tmp"
mv "$dest/llama-cli.tmp" "$dest/llama-cli"
echo "$dest/llama-cli"
