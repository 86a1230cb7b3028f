#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (and the gguf-py its converter needs) from the llama-cpp-python
# sdist on PyPI, which vendors llama.cpp, into .peers/llama.cpp (git-ignored). A benchmark-only
# peer: haq never imports it. The converter runs on haq's venv (torch, transformers) plus pydeps/. Idempotent: an existing build of the same version is kept.
#   needs: cmake, a C++ compiler (apt-get install cmake build-essential if missing)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="${HAQ_PEERS_DIR:-$ROOT/.peers}"
VERSION="0.3.36"
DEST="$PEERS/llama.cpp"
PY="${PY:-$ROOT/.venv/bin/python}"
if [[ -x "$DEST/build/bin/llama-bench" && "$(cat "$DEST/.stamp" 2>/dev/null)" == "$VERSION" ]]; then
  echo "llama.cpp: llama-bench $VERSION up to date"; exit 0
fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "llama.cpp: $tool missing: apt-get install cmake build-essential" >&2; exit 1; }
done
mkdir -p "$PEERS/src"
cd "$PEERS/src"
[[ -f "llama_cpp_python-$VERSION.tar.gz" ]] || \
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d .
rm -rf "llama_cpp_python-$VERSION" "$DEST"
tar xzf "llama_cpp_python-$VERSION.tar.gz"
mv "llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST"
cd "$DEST"
# The converter tries sentencepiece first; kept beside it, not in haq's venv.
"$PY" -m pip install -q --target "$DEST/pydeps" sentencepiece
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build build --target llama-bench -j "$(nproc)"
echo "$VERSION" > .stamp
echo "llama.cpp: built $DEST/build/bin/llama-bench"
