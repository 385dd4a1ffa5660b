#!/usr/bin/env bash
# The served path on a lent GPU machine (the `run` device tool), with the carry bench/gpu_carry.sh builds
# (docs/GPU_CARRY.md). flash-attn-4 does not fit one call beside the rest, so it takes two calls of one
# warm machine (it stays warm ~30 s after a call; /tmp survives while it does):
#
#   call 1, carry [".carry-gpu/gpu/fa4-a.tar.xz"]:                      bash bench/gpu_check.sh fa4-a
#   call 2 at once, carry fa4-b, site and tok (.carry-gpu/gpu/...):     bash bench/gpu_check.sh serve ARGS
#
# Without fa4-b in the carry, `serve` runs with cuDNN attention (one call). ARGS go to bench/serve_gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
C=.carry-gpu/gpu
case "${1:-}" in
fa4-a)
  mkdir -p /tmp/fa4 && tar -C /tmp/fa4 -xJf $C/fa4-a.tar.xz && echo "fa4-a unpacked into /tmp/fa4" ;;
serve)
  shift
  mkdir -p /tmp/site /tmp/tok
  tar -C /tmp/site -xJf $C/site.tar.xz
  tar -C /tmp/tok -xf $C/tok.tar
  TOK=$(dirname "$(find /tmp/tok -name tokenizer.json | head -1)")
  FA4=""
  if [ -f $C/fa4-b.tar.xz ]; then
    [ -d /tmp/fa4/nvidia_cutlass_dsl ] || { echo "fa4-b without fa4-a: the machine went cold; run call 1 again" >&2; exit 3; }
    tar -C /tmp/fa4 -xJf $C/fa4-b.tar.xz
    FA4=:/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
  fi
  export PATH=/tmp/site:$PATH PYTHONPATH=$PWD:/tmp/site$FA4 NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch; from ringserve.engine.attention import backend_name; print('attention backend:', backend_name(torch.device('cuda')))"
  python3 bench/serve_gpu.py --device cuda --tokenizer-dir "$TOK" "$@" ;;
*)
  echo "usage: bash bench/gpu_check.sh fa4-a | serve [bench/serve_gpu.py args]" >&2; exit 2 ;;
esac
