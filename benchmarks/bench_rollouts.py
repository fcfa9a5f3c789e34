"""Rollout speed: teacher-mixed sampling (pipeline.generation.sample) against transformers' `generate`.

For each student:teacher pair and batch size, in one run, generated tokens per second of
    mixed      our KV-cached teacher-mixed sampler (teacher_mix 0.2, both models run at every token)
    naive      the same sampler with use_cache=False: the whole sequence recomputed at every token
    gen_s      the student alone through `generate` (KV cache, plain sampling)
    gen_s+t    `generate` running both models' forwards: student `generate` + teacher `generate`, times added
(gen_s+t is the cost of two cached `generate` runs of the same batch and length, i.e. both models' cached
forwards, each with `generate`'s own per-token sampling overhead.)
Target (issue 5): mixed >= 0.8x gen_s+t at equal batch. EOS is disabled so every method makes exactly
--new-tokens per row; prompts are random tokens, left-padded to lengths between half and all of --prompt-len.

    python -m benchmarks.bench_rollouts                      # embedded default and GPT-2-small pairs, CPU
    python -m benchmarks.bench_rollouts --device cuda --dtype bf16 --pairs gpt2:gpt2-xl --new-tokens 128
"""

import argparse

import torch
from tqdm import tqdm

from benchmarks.common import (
    DTYPES,
    EOS,
    MIB,
    SHAPES,
    add_common_arguments,
    best_time,
    build_model,
    parse_pair,
    print_table,
    setup_device,
    tensor_peak,
)
from pipeline.generation import left_pad, sample

TEACHER_MIX = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--pairs", nargs="+", default=["embedded-student:embedded-teacher", "gpt2:gpt2"],
                        help="STUDENT:TEACHER shape names")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per measurement (fastest is kept)")
    parser.add_argument("--skip-naive", action="store_true", help="skip the uncached sampler (slow on large models)")
    args = parser.parse_args()
    device = setup_device(args)
    dtype = DTYPES[args.dtype]
    print(f"device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, prompt {args.prompt_len}, "
          f"new tokens {args.new_tokens}, teacher_mix {TEACHER_MIX}; tokens/s = batch x new tokens / seconds")

    rows = []
    for pair in args.pairs:
        student_shape, teacher_shape = parse_pair(pair)
        student = build_model(student_shape, device, dtype, seed=1)
        teacher = build_model(teacher_shape, device, dtype, seed=2)
        vocab_size = SHAPES[student_shape][1]
        for batch in tqdm(args.batches, desc=pair):
            prompt_generator = torch.Generator().manual_seed(batch)
            lengths = torch.randint(args.prompt_len // 2 + 1, args.prompt_len + 1, (batch,), generator=prompt_generator)
            prompts = [torch.randint(1, vocab_size, (int(n),), generator=prompt_generator).tolist() for n in lengths]
            prompt_ids, prompt_mask = left_pad(prompts, EOS)
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

            def ours(use_cache: bool):
                # eos_token_id=-1 matches no token: rows never end, as in `generate` without an EOS.
                rollout = sample(
                    student, prompt_ids, prompt_mask, max_new_tokens=args.new_tokens, eos_token_id=-1,
                    pad_token_id=EOS, generator=torch.Generator(device=device).manual_seed(0), teacher=teacher,
                    teacher_mix=TEACHER_MIX, use_cache=use_cache,
                )
                assert rollout.response_ids.shape == (batch, args.new_tokens)

            def generate(model):
                with torch.no_grad():
                    output = model.generate(
                        prompt_ids, attention_mask=prompt_mask, do_sample=True, top_k=0, top_p=1.0,
                        max_new_tokens=args.new_tokens,
                    )
                assert output.shape == (batch, prompt_ids.shape[1] + args.new_tokens)

            tokens = batch * args.new_tokens
            mixed = best_time(lambda: ours(True), device, args.repeats)
            mixed_memory, _ = tensor_peak(lambda: ours(True), device)
            naive = float("nan") if args.skip_naive else best_time(lambda: ours(False), device, args.repeats)
            generate_student = best_time(lambda: generate(student), device, args.repeats)
            generate_teacher = best_time(lambda: generate(teacher), device, args.repeats)
            both = generate_student + generate_teacher
            rows.append([pair, batch, tokens / mixed, tokens / naive, tokens / generate_student, tokens / both,
                         both / mixed, naive / mixed, mixed_memory / MIB])

    print()
    print_table(["student:teacher", "batch", "mixed tok/s", "naive tok/s", "gen_s tok/s", "gen_s+t tok/s",
                 "mixed/gen_s+t (>=0.8)", "mixed/naive", "mixed peak MiB"], rows)
    print("mixed peak MiB: peak of the tensors the mixed sampler allocates (KV caches, logits), models excluded")


if __name__ == "__main__":
    main()
