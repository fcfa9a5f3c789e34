"""What every benchmark shares: model shapes, device and dtype flags, timing, and memory readings.

Models are random-initialised GPT-2s built by the pipeline's own `build_gpt2`, so the benchmarks need no network
and time exactly the code the pipeline runs. Memory of a piece of code (`tensor_peak`) is the peak of the bytes
held by tensors it allocated: the CUDA allocator's statistics on a GPU; on the CPU, the allocation and free events
that torch's profiler records (resident memory would also count library pages and the BLAS's caches). A whole
process's peak (`process_peak_rss`) is its VmHWM.
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.config import Architecture
from pipeline.models import build_gpt2, count_parameters

# name -> (n_layer, n_embd, n_head, vocab_size, n_positions). The "embedded" pair is params.yaml's default models
# (vocabulary = data.tokenizer_vocab_size); the others are the GPT-2 family's shapes with GPT-2's vocabulary.
SHAPES = {
    "embedded-student": (2, 64, 2, 1024, 192),
    "embedded-teacher": (4, 128, 2, 1024, 192),
    "gpt2": (12, 768, 12, 50257, 1024),
    "gpt2-medium": (24, 1024, 16, 50257, 1024),
    "gpt2-large": (36, 1280, 20, 50257, 1024),
    "gpt2-xl": (48, 1600, 25, 50257, 1024),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Token id that the benchmarks treat as EOS; generation never stops early so every method produces the same count.
EOS = 0
MIB = 2**20


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="model weights' dtype")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def parse_pair(text: str) -> tuple[str, str]:
    """'STUDENT:TEACHER' shape names, e.g. 'gpt2:gpt2-xl'."""
    student, _, teacher = text.partition(":")
    for name in (student, teacher):
        if name not in SHAPES:
            raise SystemExit(f"unknown shape {name!r} in --pairs {text!r}; valid shapes: {', '.join(SHAPES)}")
    if SHAPES[student][3] != SHAPES[teacher][3]:
        raise SystemExit(f"--pairs {text!r}: student and teacher must share one vocabulary")
    return student, teacher


def setup_device(args: argparse.Namespace) -> torch.device:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU is visible")
        torch.backends.cuda.matmul.allow_tf32 = True
    return device


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    n_layer, n_embd, n_head, vocab_size, n_positions = SHAPES[shape]
    torch.manual_seed(seed)
    # Built on the device: a random init of GPT-2 XL takes tens of seconds on the CPU, well under one on a GPU.
    with device:
        model = build_gpt2(Architecture(n_layer=n_layer, n_embd=n_embd, n_head=n_head), vocab_size, n_positions, EOS)
    # No EOS in the generation config: `generate` then always runs max_new_tokens, like our sampler given no EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = EOS
    return model.to(device=device, dtype=dtype).eval()


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but the position embeddings (a lookup). The token
    embedding is counted once, as the tied LM head's matmul."""
    return count_parameters(model) - model.transformer.wpe.weight.numel()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one untimed warm-up: the least disturbed by other load."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return min(times)


def tensor_peak(fn, device: torch.device):
    """(peak bytes of tensors allocated during fn() above those held before it, fn's result)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        result = fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    held, peak = 0, 0
    for _, change in events:
        held += change
        peak = max(peak, held)
    return peak, result


def current_rss() -> int:
    return _proc_status_bytes("VmRSS")


def process_peak_rss() -> int:
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in the models' dtype: the machine's practical peak for this workload."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 5
    seconds = best_time(lambda: [a @ b for _ in range(repeats)], device, repeats=3) / repeats
    return 2 * size**3 / seconds


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[_format(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)
