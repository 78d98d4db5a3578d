#!/usr/bin/env bash
# The GPU benchmarks of issues 3 and 4, in one run, next to the reference probe.
#
#   bench/gpu_run.sh [OUTDIR]
#
# Run from the repository root on a GPU machine whose python3 has torch (CUDA) and transformers.
# Wheels in .whl/ (diffusers, importlib_metadata, pydantic, ..., and transformers) are
# installed first when present, for machines without a package index; transformers from .whl
# goes to gpuhost's benchmarks only, so the reference probe (.whl/reference_gpu_probe.py or
# ../shared/bench/reference_gpu_probe.py) runs on the machine's own stack.
set -u
out="${1:-${OUT:-/tmp/gpuhost-bench}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpuhost-site $(ls .whl/*.whl | grep -v /transformers-) || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpuhost-tf .whl/transformers-*.whl || exit 1
fi
site=/tmp/gpuhost-site
ours="/tmp/gpuhost-tf:$site:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

probe=.whl/reference_gpu_probe.py
[ -f "$probe" ] || probe=../shared/bench/reference_gpu_probe.py
echo "== reference probe"
PYTHONPATH=$site timeout 180 python3 "$probe" >"$out/probe.log" 2>&1
grep '^{' "$out/probe.log"; grep -A3 Traceback "$out/probe.log" | tail -4

echo "== gpuhost LLaVA engine (LLaVA-Llama-3-8B architecture, one image per request)"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -lms 500 \
  >"$out/llava_gpu_util.csv" 2>/dev/null &
sampler=$!
PYTHONPATH=$ours timeout 300 python3 bench/llava_gpu.py --tokens 128 >"$out/llava.log" 2>&1
kill $sampler 2>/dev/null
grep '^{' "$out/llava.log"; grep -q Traceback "$out/llava.log" && tail -25 "$out/llava.log"
awk -F'[ ,%]+' '{ if ($1 > 0) { n++; s += $1 } } END { if (n) print "mean GPU utilisation while busy:", s / n, "% over", n, "samples" }' "$out/llava_gpu_util.csv"

echo "== gpuhost Stable Diffusion engine (SD 1.5 architecture, 512x512, 25 steps)"
for variant in "" "--no-cudnn-attention --no-warm"; do
  PYTHONPATH=$ours timeout 100 python3 bench/sd_engine.py --arch sd15 --device cuda \
    --size 512 --steps 25 --model /tmp/sd15 $variant >"$out/sd.log" 2>&1
  grep '^{' "$out/sd.log"; grep -q Traceback "$out/sd.log" && tail -25 "$out/sd.log"
done
