#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (for the llama.cpp row of benchmarks/chat_speed.py) from the llama.cpp
# sources vendored in the llama-cpp-python sdist on PyPI; about 10 minutes on 2 cores. Needs cmake and a C++
# compiler (Debian: apt install cmake g++). Prints the binary's path; pass it with --llama-bench or $LLAMA_BENCH.
#   bash scripts/build_llama_bench.sh [build-dir]
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
BUILD=$(realpath -m "${1:-build/llama.cpp}")
mkdir -p "$BUILD"
python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD"
tar -xzf "$BUILD/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
SRC="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$BUILD/out" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > "$BUILD/cmake.log"
cmake --build "$BUILD/out" -j"$(nproc)" --target llama-bench > "$BUILD/build.log"
echo "$BUILD/out/bin/llama-bench"
