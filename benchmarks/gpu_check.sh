#!/usr/bin/env bash
# The GPU check in one go, on a machine with one NVIDIA GPU (H100/H200 class), from the repository root:
#
#   bash benchmarks/gpu_check.sh OUTDIR            # installs CUDA JAX, CUDA torch, PEFT into .venv-gpu, then runs:
#   bash benchmarks/gpu_check.sh OUTDIR --dry-run  # the same steps at toy sizes on this machine's CPU (.venv),
#                                                  # no install: what tests/test_speed.py runs so this cannot rot
#
# 1. python -m benchmarks.speed at the ~1B shape (Llama-3.2-1B, bf16, batch 4 x 2048): lora_jax LoRA r16 and full
#    FT through the real train step, PEFT+PyTorch (CUDA, bf16 autocast) and naive merged LoRA beside them, and DoRA
#    r16 in both frameworks (each against its own LoRA step);
# 2. python -m benchmarks.bf16_check: bf16 compute vs fp32 on the same tiny run (loss curves within tolerance);
# 3. a 100-step tiny experiment (experiments.main, finetune.py:tiny, LoRA and full FT);
# then prints MFU: achieved FLOP/s (XLA's count) over the bf16 matmul peak measured in the same run, and over the
# nominal dense bf16 peak of an H100/H200 (989 TFLOP/s). Goals on an H100/H200: LoRA r16 >= 50% MFU at the ~1B shape
# and >= 1.5x PEFT's tokens/s. Everything lands in OUTDIR (speed.json, bf16_check.json, RESULTS.md, tiny/, log.txt).
# Budget: under 8 minutes (install ~2-3 min, speed ~2 min, bf16 check ~1 min, tiny experiment ~1 min); each step
# has its own timeout.
set -euo pipefail

usage() { echo "usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
DRY=0
if [[ $# -eq 2 ]]; then
  [[ $2 == "--dry-run" ]] || usage
  DRY=1
fi
[[ $OUT != --* ]] || usage
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
START=$(date +%s)

if [[ $DRY == 1 ]]; then
  PY=${PYTHON:-.venv/bin/python}
  export JAX_PLATFORMS=cpu
  SHAPE=tiny; REPEATS=1; BF16_STEPS=3; BF16_METHODS=lora; TINY_STEPS=3
  # a small tiny base (built once, in OUTDIR) for the bf16 check and the tiny experiment alike
  BASE=(--config.tiny_base.steps=20 --config.tiny_base.corpus_documents=200 "--config.tiny_base.cache_dir=$OUT/base")
  TINY_EXTRA=(--config.eval.arithmetic_examples=0 "${BASE[@]}")
  TIMEOUT=600
  echo "dry run on CPU with $PY: toy sizes, nothing installed"
else
  command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: this needs an NVIDIA GPU" >&2; exit 1; }
  GPUS=$(nvidia-smi -L | grep -c '^GPU' || true)
  [[ $GPUS -ge 1 ]] || { echo "gpu_check: nvidia-smi lists no GPU" >&2; exit 1; }
  nvidia-smi -L
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU
  # JAX and torch share the GPU in one process: JAX must not grab 75% of its memory up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  PY=.venv-gpu/bin/python
  if [[ ! -x $PY ]]; then
    python3 -m venv .venv-gpu
  fi
  # The pinned CPU requirements, with the CUDA builds of jax and torch (torch's default PyPI wheel on Linux x86-64
  # is the CUDA one), then this package.
  $PY -m pip install -q --upgrade pip
  $PY -m pip install -q -r requirements.txt "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)" \
      "torch==$(grep '^torch==' requirements-test.txt | cut -d= -f3)" \
      "peft==$(grep '^peft==' requirements-test.txt | cut -d= -f3)"
  $PY -m pip install -q --no-deps -e .
  $PY -c "import jax, torch; assert jax.default_backend() == 'gpu', jax.devices(); assert torch.cuda.is_available(); print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.get_device_name())"
  SHAPE=1b; REPEATS=5; BF16_STEPS=40; BF16_METHODS=lora,full; TINY_STEPS=100; BASE=(); TINY_EXTRA=()
  TIMEOUT=300
  echo "installed in $(( $(date +%s) - START )) s"
fi

step() {  # step NAME COMMAND...: runs it with a timeout, logs to OUTDIR/log.txt, stops the check when it fails
  local name=$1; shift
  local t0; t0=$(date +%s)
  echo "== $name: $*"
  if ! timeout "$TIMEOUT" "$@"; then
    echo "gpu_check: step '$name' failed or ran past ${TIMEOUT}s" >&2
    exit 1
  fi
  echo "== $name: $(( $(date +%s) - t0 )) s"
}

{
  step speed "$PY" -m benchmarks.speed --shapes "$SHAPE" --ranks 16 --peers peft,merged,dora --repeats "$REPEATS" \
      --out "$OUT/speed.json"
  step bf16_check "$PY" -m benchmarks.bf16_check --steps "$BF16_STEPS" --methods "$BF16_METHODS" \
      --out "$OUT/bf16_check.json" "${BASE[@]}"
  step results "$PY" -m benchmarks.results --results "$OUT" --md "$OUT/RESULTS.md"
  step tiny_experiment "$PY" -m experiments.main --config experiments/configs/finetune.py:tiny \
      --workdir "$OUT/tiny" --overwrite --config.train.steps="$TINY_STEPS" "${TINY_EXTRA[@]}"
  step mfu "$PY" -m benchmarks.speed --mfu "$OUT/speed.json"
  echo "gpu_check: done in $(( $(date +%s) - START )) s; results in $OUT"
} 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
