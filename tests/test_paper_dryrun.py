"""Paper-scale dry run: configs/paper-gpt2.yaml end to end on the CPU, on random-initialised models of the real
GPT-2 shapes, a couple of steps with tiny batches, so that shape, memory-layout and config bugs surface before
anyone spends GPU hours.

The params are the paper config with the official-code overlay (configs/official-gpt2.yaml: n-gram blocking, the
official whitening, the unweighted single-step term, prompt truncation, ...) and configs/paper-gpt2-dryrun.yaml
deep-merged over it, nothing else: the spec's optimisers and schedules, max length 512 / prompt 256, MiniLLM's
losses and mixing, DeepSpeed ZeRO stage 1 (on the CPU in fp32: one process, gloo), the three students of the GPT-2
family with their own SFT settings. The paper's own defaults of those switches run in the embedded default and the
end-to-end test. What the overlay and this test replace, and why:

- Tokenizer. No GPT-2 files offline, so a byte-level BPE with GPT-2's exact layout: 256 byte symbols, 50,000
  merges, <|endoftext|> = 50256, its first merges trained on the dry-run text so that words are one or two tokens,
  as with GPT-2's (a no-context prompt takes 35). The vocabulary size, the width of every logits tensor and
  embedding, is what memory and the chunked divergences depend on.
- Students: 120M is an `arch` of gpt2's shape (12 x 768 x 12, 124M parameters with the tied 50,257 x 768
  embedding), built from scratch and trained 2 steps by pretrain_student, then every student stage. 340M and 760M
  keep their labels and their overrides (760M: 10 SFT epochs) on small shapes.
- Teacher. GPT-2 XL (48 x 1600 x 25, 1.56B parameters) cannot be fine-tuned here: fp32 AdamW holds weights,
  gradients and two moments, 16 bytes per parameter, ~25 GB, more than this 24 GiB machine. So `dvc repro` runs
  teacher SFT (2 steps) on a random-initialised gpt2-medium shape (24 x 1024 x 16, 355M) given as a local
  "pretrained" directory (which also brings the tokenizer); then a random GPT-2 XL replaces the SFT teacher and
  distill_minillm is rerun with it: its teacher only runs forward, in teacher-mixed KV-cached sampling beside the
  student, and for the rewards and the exact single-step reverse KL (full-vocabulary logits of both models). KD's
  teacher forward is the same call; teacher generation and evaluation run the same sampler as the rollouts. (On
  this CPU one XL decoding step takes seconds, so rerunning more stages with it would double the test's time.)
- Data: a small Dolly-format JSONL and PT corpus written here (source: jsonl), not the Hub.

Measured on the 2-core, 24 GiB box (153 GFLOP/s), nothing else running: 37 min with the three students and the
compute-matched evaluations (it was 10 min 14 s with one student; 100 s of it MiniLLM with the XL teacher, whose
stage then peaked at 13.0 GiB RSS). The bound asserted on one stage's peak RSS, 16 GiB, held.

By hand (the temporary repo, with its dvc.lock, metrics and MLflow store, stays under --basetemp):
    pytest tests/test_paper_dryrun.py --basetemp=/tmp/paper-dryrun
"""

import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from pipeline.config import deep_merge
from pipeline.data import build_prompt
from tests.workspace import copy_sources, run, stage_command

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper-gpt2.yaml"
OFFICIAL_OVERLAY = REPO / "configs" / "official-gpt2.yaml"
DRYRUN_OVERLAY = REPO / "configs" / "paper-gpt2-dryrun.yaml"
EOS_TOKEN = "<|endoftext|>"
GPT2_VOCAB_SIZE = 50257
GPT2_MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16}
GPT2_XL = {"n_layer": 48, "n_embd": 1600, "n_head": 25}
MAX_RSS_BYTES = 16 * 2**30

pytestmark = [pytest.mark.slow, pytest.mark.paper]



def gpt2_layout_tokenizer(texts: list[str], size: int = GPT2_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A byte-level BPE with GPT-2's layout: 256 byte symbols, 50,000 merges, then <|endoftext|> = 50256 (or `size`
    tokens in all, EOS the last, for another family's vocabulary size).

    The first merges are trained on `texts`, so the dry-run text splits into about as many tokens as GPT-2's own
    tokenizer would give (word pieces, not bytes); made-up merges (pairs of printable symbols, then those pairs plus
    one more) fill the rest of the ids."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=min(size - 1, GPT2_VOCAB_SIZE - 1), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    model = json.loads(trained.to_str())["model"]
    vocab, merges = dict(model["vocab"]), [tuple(merge) for merge in model["merges"]]
    printable = sorted(c for c in pre_tokenizers.ByteLevel.alphabet() if "!" <= c <= "~" or c == "Ġ")

    def add(left: str, right: str) -> None:
        if len(vocab) < size - 1 and left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))

    pairs = [a + b for a in printable for b in printable]
    for pair in pairs:
        add(pair[0], pair[1])
    for pair in pairs:
        for symbol in printable:
            add(pair, symbol)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, unk_token=EOS_TOKEN)


def save_random_gpt2(shape: dict, tokenizer, out_dir: Path, seed: int) -> None:
    """A randomly initialised GPT-2 of `shape` as a pretrained-model directory.

    Built on the meta device and filled once with GPT-2's N(0, 0.02) (transformers' own initialisation of the XL
    shape takes ~40 s here). Stored in bf16 to halve the write; the stages load it as fp32 (engine.precision), the
    layout they train and run in."""
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, **shape,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    model.tie_weights()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("weight"):
                parameter.fill_(1.0)  # LayerNorm gains
            else:
                parameter.zero_()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


TOPICS = [
    ("Name three primary colours.", "", "Red, yellow and blue are the traditional primary colours.", "open_qa"),
    ("Summarise the passage in one sentence.",
     "The river rises in the northern hills, crosses the plain in wide loops and reaches the sea at a busy port.",
     "The river flows from the northern hills across the plain to a port on the sea.", "summarization"),
    ("Is a tomato a fruit or a vegetable?", "", "Botanically a tomato is a fruit, though cooks treat it as a vegetable.", "open_qa"),
    ("Write a short note thanking a colleague.", "",
     "Thank you for your help with the report this week; it made a real difference.", "creative_writing"),
    ("When did the library open?", "The town library opened in 1921 and moved to its present building in 1968.",
     "It opened in 1921.", "closed_qa"),
    ("Classify each as a bird or a fish: salmon, robin, trout, eagle.", "",
     "Salmon and trout are fish; robin and eagle are birds.", "classification"),
    ("Give two tips for sleeping well.", "", "Keep a regular bedtime and avoid screens for an hour before sleep.", "brainstorming"),
]


def dryrun_texts() -> tuple[list[dict], list[str]]:
    """Seven Dolly records (4 train, 1 valid, 2 test: two SFT steps of batch 2) and the PT documents."""
    records = [{"instruction": i, "context": c, "response": r, "category": k} for i, c, r, k in TOPICS]
    documents = [f"{r['context']} {r['instruction']} {r['response']}".strip() for r in records] * 3
    return records, documents


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))




def finite_numbers(metrics: dict) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))


def test_paper_config_runs_end_to_end_on_gpt2_shapes(tmp_path):
    workdir = tmp_path / "repo"
    workdir.mkdir()
    copy_sources(workdir)
    (workdir / "reports").mkdir(exist_ok=True)
    paper = yaml.safe_load(PAPER_CONFIG.read_text())
    params = deep_merge(deep_merge(paper, yaml.safe_load(OFFICIAL_OVERLAY.read_text())),
                        yaml.safe_load(DRYRUN_OVERLAY.read_text()))
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert list(params["models"]["students"]) == ["120M", "340M", "760M"]
    student = "120M"  # gpt2's shape: the one the XL teacher runs beside below
    [seed] = params["train_seeds"]

    records, documents = dryrun_texts()
    write_jsonl(workdir / params["data"]["jsonl_path"], records)
    write_jsonl(workdir / params["data"]["pretrain"]["path"], [{"text": d} for d in documents])
    tokenizer = gpt2_layout_tokenizer([build_prompt(r["instruction"], r["context"]) + r["response"] for r in records] + documents)
    assert len(tokenizer) == GPT2_VOCAB_SIZE and tokenizer.eos_token_id == GPT2_VOCAB_SIZE - 1
    save_random_gpt2(GPT2_MEDIUM, tokenizer, workdir / params["models"]["teacher"]["name_or_path"], seed=0)

    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow-test.db'}",
        "OMP_NUM_THREADS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    for inherited in ("DVC_ROOT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(inherited, None)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(["git", "init", "-q"], workdir, env)
    (workdir / ".gitignore").write_text((workdir / ".gitignore").read_text() + "/dryrun/\n")
    run([*git, "add", "-A"], workdir, env)
    run([*git, "commit", "-qm", "paper dry run"], workdir, env)

    # 1. The whole pipeline through DVC, gpt2-medium-shaped teacher.
    repro = run(["dvc", "repro"], workdir, env)
    stages = run(["dvc", "stage", "list", "--name-only"], workdir, env).stdout.split()
    for stage in stages:
        assert f"Running stage '{stage}'" in repro.stdout, stage
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    for stage, entry in lock.items():
        for out in entry.get("outs", []):
            assert (workdir / out["path"]).exists(), f"{stage}: {out['path']}"

    stats = json.loads((workdir / "data" / "stats.json").read_text())
    assert stats["vocab_size"] == GPT2_VOCAB_SIZE
    assert (stats["train_examples"], stats["valid_examples"]) == (4, 1)
    student_config = json.loads((workdir / "models" / student / "base" / "config.json").read_text())
    assert (student_config["n_layer"], student_config["n_embd"], student_config["n_head"]) == (12, 768, 12)
    assert student_config["vocab_size"] == GPT2_VOCAB_SIZE
    assert json.loads((workdir / "metrics" / "pretrain" / f"{student}.json").read_text())["parameters"] > 124_000_000
    for metrics_file in sorted((workdir / "metrics").rglob("*.json")):
        assert finite_numbers(json.loads(metrics_file.read_text())), metrics_file
    assert json.loads((workdir / "metrics" / "train_teacher.json").read_text())["steps"] == 2
    # Each student's own SFT settings reached its stages: 760M's 10 epochs of 2 steps, the others' one epoch.
    init_steps = {label: json.loads((workdir / "metrics" / "init_student" / f"{label}-seed{seed}.json").read_text())["steps"]
                  for label in params["models"]["students"]}
    assert init_steps == {"120M": 2, "340M": 2, "760M": 20}
    # The official switches reached the stages that read them (dvc.lock records each stage's params).
    assert lock[f"evaluate@minillm-760M-{seed}"]["params"]["params.yaml"]["evaluate"]["no_repeat_ngram_size"] == 6
    minillm_params = lock[f"distill_minillm@340M-{seed}"]["params"]["params.yaml"]["distill.minillm"]
    assert (minillm_params["whitening"], minillm_params["single_step_weighted"]) == ("official_micro_batch", False)
    assert lock["build_data"]["params"]["params.yaml"]["data"]["long_eval_prompts"] == "truncate"
    assert json.loads((workdir / "metrics" / "distill" / "minillm" / f"{student}-seed{seed}.json").read_text())["steps"] == 2
    assert "MiniLLM" in (workdir / "reports" / "table1.md").read_text()

    # 2. GPT-2 XL as the SFT teacher of MiniLLM, where it only runs forward.
    teacher_dir = workdir / "models" / "teacher" / "sft"
    shutil.rmtree(teacher_dir)
    save_random_gpt2(GPT2_XL, tokenizer, teacher_dir, seed=1)
    minillm_metrics = workdir / "metrics" / "distill" / "minillm" / f"{student}-seed{seed}.json"
    minillm_metrics.unlink()
    run(stage_command(f"distill_minillm@{student}-{seed}", workdir), workdir, env)
    metrics = json.loads(minillm_metrics.read_text())
    assert finite_numbers(metrics) and metrics["steps"] == 2 and metrics["teacher_forward_tokens"] > 0, metrics
    assert (workdir / "models" / student / f"seed{seed}" / "minillm" / "model" / "model.safetensors").is_file()

    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    print(f"paper dry run: peak RSS of one stage {peak_rss / 2**30:.1f} GiB")
    assert peak_rss < MAX_RSS_BYTES
