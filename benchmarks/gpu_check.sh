#!/usr/bin/env bash
# The GPU check (issues 5, 16 and 17) on one H200, bf16 throughout. Parts 1-2 take about 3.5 minutes; part 3 about
# 10 (31 stages of 16-31 s each there, nearly all process start-up): 14 minutes in all, over the 5 the issues asked.
# Figures of the 2026-12-04 run: benchmarks/results/gpu_check_h200.md.
#  1. the rollout and step benchmarks on a Llama-3.2-1B-shaped student with a Llama-3.1-8B-shaped teacher (128K
#     vocabulary, grouped-query attention, the pipeline's LlamaDecoder sampler), random init: tokens/s, achieved
#     FLOP/s against the measured bf16 matmul peak and against the H200's nominal 989 TFLOP/s (MFU), peak memory;
#  2. the same for GPT-2 (teacher GPT-2 XL; rollouts with the GPT-2 small student, the step at GPT-2 large, the
#     shape of the 40 % MFU target);
#  3. a short real `dvc repro` of a GPT-2-shaped config on the GPU, every stage for a couple of steps
#     (benchmarks/gpu_repro.py: gpt2-medium-shaped teacher, gpt2-shaped student, the seven methods, the report).
# Each part has its own time limit, so that one stuck part leaves the others' figures.
# Run from the repository root with the project's packages (CUDA build of torch):  bash benchmarks/gpu_check.sh
# bench_trl is CPU-only by design (tiny models) and is not part of this check.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
GPU_REPRO_DIR=${GPU_REPRO_DIR:-$(mktemp -d)/repo}
failed=0
part() {  # part SECONDS TITLE COMMAND...: run one part under its limit; a failure is reported and the rest still run
    local limit=$1 title=$2
    shift 2
    echo "== $title"
    local start=$SECONDS
    timeout "$limit" "$@" || { echo "!! FAILED ($?): $title"; failed=1; }
    echo "   ($((SECONDS - start)) s)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"

part 75 "rollouts: Llama-1B-shaped student, Llama-8B-shaped teacher" \
    "$PYTHON" -m benchmarks.bench_rollouts --device cuda --dtype bf16 --pairs llama-1b:llama-8b \
    --batches 8 32 --prompt-len 128 --new-tokens 64 --repeats 1 --skip-naive
part 60 "one MiniLLM step: student llama-1b, teacher llama-8b" \
    "$PYTHON" -m benchmarks.bench_step --device cuda --dtype bf16 --pair llama-1b:llama-8b \
    --batch 8 --prompt-len 256 --response-len 256 --pt-batch 8 --pt-len 512 --repeats 3 --chunks 16,64 --nominal-tflops 989
part 60 "rollouts: GPT-2 student, GPT-2 XL teacher" \
    "$PYTHON" -m benchmarks.bench_rollouts --device cuda --dtype bf16 --pairs gpt2:gpt2-xl \
    --batches 8 32 --prompt-len 128 --new-tokens 64 --repeats 1 --skip-naive
part 45 "one MiniLLM step: student gpt2-large, teacher gpt2-xl" \
    "$PYTHON" -m benchmarks.bench_step --device cuda --dtype bf16 --pair gpt2-large:gpt2-xl \
    --batch 8 --prompt-len 256 --response-len 256 --pt-batch 8 --pt-len 512 --repeats 3 --chunks 16,64 --nominal-tflops 989
part 720 "dvc repro of a GPT-2-shaped config on the GPU, bf16" \
    "$PYTHON" -m benchmarks.gpu_repro --workdir "$GPU_REPRO_DIR" --device cuda --precision bf16
exit $failed
