#!/usr/bin/env bash
# The GPU benchmarks of issues 3, 4 and 22, in one run, next to the reference probe.
#
#   bench/gpu_run.sh [OUTDIR]
#
# GPUHOST_BENCH_SECONDS: the whole run's budget (570); GPUHOST_BENCH_SECTIONS: which of
# "probe sd llava" to run (all); GPUHOST_SD_VARIANTS, GPUHOST_LLAVA_VARIANTS: which variants of
# each engine (below).
#
# Run from the repository root on a GPU machine whose python3 has torch (CUDA) and transformers.
# Wheels in .whl/ (diffusers, importlib_metadata, pydantic, ..., and transformers) are
# installed first when present, for machines without a package index; transformers from .whl
# goes to gpuhost's benchmarks only, so the reference probe (.whl/reference_gpu_probe.py or
# ../shared/bench/reference_gpu_probe.py) runs on the machine's own stack.
# Sections run in order of what they settle; one that would overrun the budget gets what is
# left of it (and is cut there), so a short lease still returns the first ones whole.
set -u
out="${1:-${OUT:-/tmp/gpuhost-bench}}"
mkdir -p "$out"
deadline=$((SECONDS + ${GPUHOST_BENCH_SECONDS:-570}))
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/gpuhost-inductor
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpuhost-site $(ls .whl/*.whl | grep -v /transformers-) || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpuhost-tf .whl/transformers-*.whl || exit 1
fi
site=/tmp/gpuhost-site
ours="/tmp/gpuhost-tf:$site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

# within SECONDS_AT_MOST, or what is left of the budget: COMMAND...
within() {
  local most=$1 left=$((deadline - SECONDS))
  shift
  if [ "$left" -lt 20 ]; then echo "skipped (budget spent): $*"; return 1; fi
  timeout $((most < left ? most : left)) "$@"
}

probe=.whl/reference_gpu_probe.py
[ -f "$probe" ] || probe=../shared/bench/reference_gpu_probe.py
sections=" ${GPUHOST_BENCH_SECTIONS:-probe sd llava} "
if [[ $sections == *" probe "* ]]; then
  echo "== reference probe"
  PYTHONPATH=$site within 180 python3 "$probe" >"$out/probe.log" 2>&1
  grep '^{' "$out/probe.log"; grep -A3 Traceback "$out/probe.log" | tail -4
fi

[[ $sections == *" sd "* ]] && {
echo "== gpuhost Stable Diffusion engine (SD 1.5 architecture, 512x512, 25 steps)"
# compiled with NHWC weights (the workers' default on a GPU), uncompiled (the default before),
# compiled with NCHW weights, uncompiled with NHWC weights (what a batch the compiled graph does
# not cover costs); GPUHOST_SD_VARIANTS picks some of these or the LoRA ones below
for variant in ${GPUHOST_SD_VARIANTS:-compiled uncompiled compiled-nchw uncompiled-nhwc}; do
  case $variant in
    compiled) flags="--rounds 2" ;;
    uncompiled) flags="--no-compile" ;;
    compiled-nchw) flags="--no-channels-last" ;;
    uncompiled-nhwc) flags="--no-compile --channels-last" ;;
    compiled-warm25) flags="--rounds 2 --warm-steps 25" ;;  # warmed at the full step count
    compiled-lora) flags="--lora" ;;  # every request with an adapter (fused, compiled)
    uncompiled-lora) flags="--no-compile --lora" ;;  # the same as layers, uncompiled
  esac
  name=$variant
  echo "-- $name"
  PYTHONPATH=$ours TORCH_LOGS=recompiles within 240 python3 bench/sd_engine.py --arch sd15 --device cuda \
    --size 512 --steps 25 --model /tmp/sd15 --save "$out/sd-$name.png" $flags \
    >"$out/sd-$name.log" 2>&1
  grep '^{' "$out/sd-$name.log"; grep -i -m3 -A4 "recompil" "$out/sd-$name.log"
  grep -q Traceback "$out/sd-$name.log" && tail -25 "$out/sd-$name.log"
done
PYTHONPATH=$ours python3 - "$out" <<'EOF'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
base = out / "sd-uncompiled.png"
for name in ("compiled", "compiled-nchw", "uncompiled-nhwc"):
    if base.exists() and (out / f"sd-{name}.png").exists():
        a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (base, out / f"sd-{name}.png"))
        print(f"seed 0, {name} against uncompiled: mean |difference| {np.abs(a - b).mean():.2f}"
              f" of 255, largest {np.abs(a - b).max()}")
EOF
}

[[ $sections == *" llava "* ]] && {
echo "== gpuhost LLaVA engine (LLaVA-Llama-3-8B architecture, one image per request)"
# bf16 and float8 language model layers (its quality guard first), the decode step compiled
# (the default on a GPU); bf16 uncompiled, as before issue 22. GPUHOST_LLAVA_VARIANTS picks.
for variant in ${GPUHOST_LLAVA_VARIANTS:-bf16 fp8 bf16-uncompiled}; do
  case $variant in
    bf16) flags="--weights bf16" ;;
    fp8) flags="--weights fp8" ;;
    bf16-uncompiled) flags="--weights bf16 --compile off" ;;
  esac
  echo "-- $variant"
  PYTHONPATH=$ours TORCH_LOGS=recompiles within 300 python3 bench/llava_gpu.py --tokens 128 \
    --streams 1,8,32 $flags >"$out/llava-$variant.log" 2>&1
  grep '^{' "$out/llava-$variant.log"; grep -i -m3 -A4 "recompil" "$out/llava-$variant.log"
  grep -q Traceback "$out/llava-$variant.log" && tail -25 "$out/llava-$variant.log"
done
}
echo "== done with $((deadline - SECONDS)) s of the budget left"
