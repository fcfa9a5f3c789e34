#!/usr/bin/env bash
# The GPU check (issues 5, 16 and 17): the rollout and step benchmarks at GPT-2 small, medium and large student
# shapes with a GPT-2-XL-shaped teacher, and at a Llama-3.2-1B-shaped student with a Llama-3.1-8B-shaped teacher
# (128K vocabulary, grouped-query attention, the transformers-cache sampler), bf16, random init; prints tokens/s,
# achieved FLOP/s against the measured bf16 matmul peak and against the H200's nominal 989 TFLOP/s (MFU), and peak
# GPU memory. Written to fit in 5 minutes on one H200; the Llama part has not run on a GPU yet.
# Run from the repository root with the project's venv (CUDA build of torch==2.13.0):  bash benchmarks/gpu_check.sh
# bench_trl is CPU-only by design (tiny models) and is not part of this check.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "== rollouts: teacher-mixed sampling vs generate, bf16, teacher gpt2-xl"
timeout 150 "$PYTHON" -m benchmarks.bench_rollouts --device cuda --dtype bf16 \
    --pairs gpt2:gpt2-xl gpt2-large:gpt2-xl \
    --batches 1 8 32 --prompt-len 128 --new-tokens 64 --repeats 1

echo "== rollouts: a Llama-8B-shaped teacher and a Llama-1B-shaped student, bf16"
timeout 60 "$PYTHON" -m benchmarks.bench_rollouts --device cuda --dtype bf16 --pairs llama-1b:llama-8b \
    --batches 8 32 --prompt-len 128 --new-tokens 64 --repeats 1 --skip-naive

for student in gpt2 gpt2-medium gpt2-large; do
    echo "== one MiniLLM step: student $student, teacher gpt2-xl, bf16"
    timeout 40 "$PYTHON" -m benchmarks.bench_step --device cuda --dtype bf16 --pair "$student:gpt2-xl" \
        --batch 8 --prompt-len 256 --response-len 256 --pt-batch 8 --pt-len 512 --repeats 3 --nominal-tflops 989
done

echo "== one MiniLLM step: student llama-1b, teacher llama-8b, bf16"
timeout 50 "$PYTHON" -m benchmarks.bench_step --device cuda --dtype bf16 --pair llama-1b:llama-8b \
    --batch 8 --prompt-len 256 --response-len 256 --pt-batch 8 --pt-len 512 --repeats 3 --nominal-tflops 989
