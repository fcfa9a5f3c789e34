"""What every benchmark shares: model shapes, device and dtype flags, timing, and memory readings.

Models are random-initialised decoders (GPT-2, Llama and Qwen2 shapes) built by the pipeline's own
`build_causal_lm`, so the benchmarks need no network and time exactly the code the pipeline runs. Memory of a piece
of code (`tensor_peak`) is the peak of the bytes held by tensors it allocated: the CUDA allocator's statistics on a
GPU; on the CPU, the allocation and free events that torch's profiler records (resident memory would also count
library pages and the BLAS's caches). A whole process's peak (`process_peak_rss`) is its VmHWM.
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pipeline.config import Architecture
from pipeline.models import build_causal_lm, count_parameters

# name -> (architecture, vocabulary size, positions). The "embedded" pair is params.yaml's default models
# (vocabulary = data.tokenizer_vocab_size), also in the Llama family; the others are published families' shapes.
SHAPES: dict[str, tuple[Architecture, int, int]] = {
    "embedded-student": (Architecture(n_layer=2, n_embd=64, n_head=2), 1024, 192),
    "embedded-teacher": (Architecture(n_layer=4, n_embd=128, n_head=2), 1024, 192),
    "embedded-llama-student": (Architecture(family="llama", n_layer=2, n_embd=64, n_head=2), 1024, 192),
    "embedded-llama-teacher": (Architecture(family="llama", n_layer=4, n_embd=128, n_head=2), 1024, 192),
    "gpt2": (Architecture(n_layer=12, n_embd=768, n_head=12), 50257, 1024),
    "gpt2-medium": (Architecture(n_layer=24, n_embd=1024, n_head=16), 50257, 1024),
    "gpt2-large": (Architecture(n_layer=36, n_embd=1280, n_head=20), 50257, 1024),
    "gpt2-xl": (Architecture(n_layer=48, n_embd=1600, n_head=25), 50257, 1024),
    # Llama-3.2-1B and Llama-3.1-8B: grouped-query attention, a 128K vocabulary.
    "llama-1b": (Architecture(family="llama", n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, ffn_dim=8192), 128256, 2048),
    "llama-8b": (Architecture(family="llama", n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, ffn_dim=14336), 128256, 2048),
    # Qwen2.5-0.5B and -7B, their embeddings cut to the tokenizer's 151,665 tokens as pipeline.models.fit_vocabulary
    # cuts them (the checkpoints pad to 151,936 and 152,064 rows).
    "qwen2.5-0.5b": (Architecture(family="qwen2", n_layer=24, n_embd=896, n_head=14, n_kv_head=2, ffn_dim=4864), 151665, 2048),
    "qwen2.5-7b": (Architecture(family="qwen2", n_layer=28, n_embd=3584, n_head=28, n_kv_head=4, ffn_dim=18944), 151665, 2048),
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
    if SHAPES[student][1] != SHAPES[teacher][1]:
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
    arch, vocab_size, n_positions = SHAPES[shape]
    torch.manual_seed(seed)
    # Built on the device: a random init of GPT-2 XL takes tens of seconds on the CPU, well under one on a GPU.
    with device:
        model = build_causal_lm(arch, vocab_size, n_positions, EOS)
    # No EOS in the generation config: `generate` then always runs max_new_tokens, like our sampler given no EOS.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = EOS
    return model.to(device=device, dtype=dtype).eval()


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all but lookups. Lookups are learned position embeddings
    (GPT-2's, OPT's) and an untied token embedding (Llama-8B's); a tied one is counted once, as the LM head's matmul."""
    lookups = [weight for name, weight in model.named_parameters() if name.endswith(("wpe.weight", "embed_positions.weight"))]
    embedding = model.get_input_embeddings().weight
    if embedding is not model.get_output_embeddings().weight:
        lookups.append(embedding)
    return count_parameters(model) - sum(weight.numel() for weight in lookups)


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
