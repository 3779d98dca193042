#!/usr/bin/env bash
# GPU proof in one prepared run (issue #20): compiled Triton kernels against their PyTorch references, and the
# GPU goals of Mini-Sequence (LM head + loss at Llama-3-8B shapes, Liger-Kernel beside it when installed, and
# the fused CE kernel's launch shapes), TAGCOS's batched per-sample gradients and the long-context decoders
# (one sequence prefilled; 1, 16 and 64 decoded together over random caches). Needs only PyTorch, Triton,
# transformers and peft (no Prefect, no Dask: the scripts read kernels/ directly). Each step has its own time
# limit, so the whole run stays under 8 minutes on one H100; every table and a log land in OUT_DIR.
#
#   bash bench/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash bench/gpu_check.sh OUT_DIR --smoke    # toy sizes on a CPU in about a minute (tests/test_gpu_check.py)
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--smoke]}
MODE=${2:-full}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The GPU machine has no tracecore install: expose the repository's kernels/ as tracecore.kernels (a namespace
# package of symlinks), which is all the kernel tests and benches import.
if ! "$PY" -c "import tracecore.kernels" 2>/dev/null; then
  SHIM=$(mktemp -d)
  mkdir -p "$SHIM/tracecore" && ln -s "$PWD/kernels" "$SHIM/tracecore/kernels"
  export PYTHONPATH="$SHIM:$PYTHONPATH"
fi
failed=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: output to OUT/NAME.md, stderr and timing to OUT/log.txt
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*" | tee -a "$OUT/log.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.md" 2>> "$OUT/log.txt"
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/log.txt"
  [ "$rc" -eq 0 ] || failed=1
  cat "$OUT/$name.md"
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  mode: $MODE"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "gpu: none (nvidia-smi not found)"
  "$PY" -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| cuda', torch.version.cuda, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
  "$PY" -c "from importlib.metadata import version; print('liger-kernel', version('liger-kernel'))" 2>/dev/null \
    || echo "liger-kernel: not installed (its column is left out of the LM-head table)"
} | tee "$OUT/environment.txt"

KERNEL_TESTS=(tests/test_kernels.py tests/test_long_context_kernels.py)
if [ "$MODE" = "--smoke" ]; then
  step pytest_gpu 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${KERNEL_TESTS[@]}"
  step mini_sequence 240 "$PY" bench/mini_sequence.py --smoke
  step gradients 120 "$PY" bench/gradients.py --synthetic --hidden 64 --layers 2 --vocab 1000 --lora-r 4 --seq 32 \
    --records 16 --batch 8
  step long_context 180 "$PY" bench/long_context.py --smoke
  step long_context_batch 120 "$PY" bench/long_context.py --smoke --batch 2 --methods full razor --synthetic-cache
else
  step pytest_gpu 60 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${KERNEL_TESTS[@]}"
  # the fused CE kernel alone over tile widths / warp counts, at the chunk a 32k-token Llama-3 head runs
  step ce_sweep 45 "$PY" bench/mini_sequence.py --ce-sweep 1046 128256
  # Llama-3-8B LM head (4096 x 128,256, bf16) at 4k / 32k / 64k tokens; a ~1.2 B Llama training step
  step mini_sequence 210 "$PY" bench/mini_sequence.py --hidden 4096 --vocabs 128256 --head-lengths 4096 32768 65536 \
    --step-model 1b --step-lengths 4096 16384 32768 --mst-lengths 65536 131072 --repeats 2 --cell-timeout 45 --budget-mb 40000
  # ~110 M-parameter Llama, LoRA r 128 on q/k/v/o: batched hooks vs. the batch-size-1 loop
  step gradients 45 "$PY" bench/gradients.py --synthetic --hidden 768 --layers 12 --vocab 32000 --lora-r 128 --seq 256 \
    --records 256 --batch 32 --loop-records 64
  # a random Llama with 8 KV heads at 8k-64k tokens: full vs. RazorAttention (Triton biased attention) vs. LongCache
  step long_context 60 "$PY" bench/long_context.py --hidden 1024 --layers 4 --heads 16 --kv-heads 8 \
    --lengths 8192 32768 65536 --decode 32
  # 1, 16 and 64 sequences decoded together over random caches (no prefill): past some batch the step reads the
  # KV cache instead of waiting on kernel launches
  step long_context_batch 60 "$PY" bench/long_context.py --hidden 1024 --layers 4 --heads 16 --kv-heads 8 \
    --lengths 32768 65536 --decode 16 --batch 1 16 64 --methods full razor --synthetic-cache
fi
echo "gpu_check: $([ $failed -eq 0 ] && echo 'every step finished' || echo 'a step failed or ran out of time; see log.txt') ($OUT)" \
  | tee -a "$OUT/log.txt"
exit $failed
