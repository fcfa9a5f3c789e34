"""Paper-scale dry runs of the other families' configs (configs/paper-opt.yaml, paper-llama.yaml, qwen.yaml): `dvc repro`
end to end on the CPU, on random-initialised models with the real hidden size, heads, MLP width and vocabulary of the
configs' teacher and first student, but 1 layer (teacher) and 2 (student; LLaMA-7B 1), a couple of steps per stage, so that the
shapes, the vocabulary handling and the engine wiring (ZeRO-2, gradient checkpointing, the fp16/bf16 teacher, LoRA)
surface before anyone spends GPU hours.

The params are each config with configs/paper-gpt2-dryrun.yaml's step, batch, length and data keys merged over it
(its `models` section aside) and the models replaced by local random directories; nothing else changes: the config's
optimisers, ZeRO stage, teacher precision, gradient checkpointing and MiniLLM settings run as written, on one CPU
process in fp32 for the trained model. What differs from the configs, and why:

- One student per config, its first (OPT-1.3B, LLaMA-7B, Qwen2.5-1.5B), with its own overrides, 2 layers; LLaMA-7B 1:
  at 2 layers (0.67B parameters, its 32,000 x 4,096 embeddings untied) its fp32 AdamW state beside the fp16
  LLaMA-13B-width teacher in distill_minillm peaked past this box's 23 GiB and was killed (measured 2026-12-04).
- The teacher has 1 layer: teacher SFT holds fp32 weights, gradients and two AdamW moments (16 bytes a parameter)
  plus DeepSpeed's flat fp32 partition, and at 2 layers the OPT-13B and LLaMA-13B widths (0.9-1.0B parameters,
  embeddings included) passed this 24 GiB box's memory. Its hidden size, heads, MLP width and vocabulary are real.
- Tokenizer: a byte-level BPE with the family's vocabulary size (tests/test_paper_dryrun.py's made-up merges) and EOS
  as its last id. The models' embeddings have the checkpoints' padded rows (OPT 50,272 for 50,265 tokens; Qwen2.5-7B
  152,064 and 1.5B 151,936 for 151,665), which every load cuts to the tokenizer (pipeline/models.py, fit_vocabulary).
- Qwen: the 7B-width teacher's embeddings alone are 1.1B parameters (untied, 152,064 x 3,584 twice): full fine-tuning
  needs ~21 GB of fp32 AdamW state even at 1 layer, so this run adds LoRA (configs/paper-llama-lora.yaml's adapter)
  over qwen.yaml. The LLaMA and OPT runs fine-tune every weight.

Measured on the 2-core, 24 GiB box: see README, "Dry runs of the other families".

By hand (the temporary repo stays under --basetemp):
    pytest tests/test_paper_dryrun_families.py -k opt --basetemp=/tmp/dryrun-opt
"""

import json
import os
import resource
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM

from pipeline.config import deep_merge
from pipeline.data import build_prompt
from tests.test_paper_dryrun import DRYRUN_OVERLAY, dryrun_texts, finite_numbers, gpt2_layout_tokenizer, write_jsonl
from tests.workspace import copy_sources, run

REPO = Path(__file__).resolve().parents[1]
MAX_RSS_BYTES = 22 * 2**30
LORA_ADAPTER = yaml.safe_load((REPO / "configs" / "paper-llama-lora.yaml").read_text())["engine"]["lora"]

# config -> (tokenizer size, teacher (class, config), student (class, config)): the real checkpoints' widths.
FAMILIES = {
    "paper-opt": (50265, (OPTForCausalLM, OPTConfig(  # facebook/opt-13b, opt-1.3b
        vocab_size=50272, hidden_size=5120, num_attention_heads=40, ffn_dim=20480, word_embed_proj_dim=5120,
        max_position_embeddings=2048)), (OPTForCausalLM, OPTConfig(
            vocab_size=50272, hidden_size=2048, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048,
            max_position_embeddings=2048))),
    "paper-llama": (32000, (LlamaForCausalLM, LlamaConfig(  # huggyllama/llama-13b, llama-7b
        vocab_size=32000, hidden_size=5120, num_attention_heads=40, intermediate_size=13824,
        max_position_embeddings=2048)), (LlamaForCausalLM, LlamaConfig(
            vocab_size=32000, hidden_size=4096, num_attention_heads=32, intermediate_size=11008,
            max_position_embeddings=2048))),
    "qwen": (151665, (Qwen2ForCausalLM, Qwen2Config(  # Qwen/Qwen2.5-7B, Qwen2.5-1.5B
        vocab_size=152064, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
        max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=False)), (Qwen2ForCausalLM, Qwen2Config(
            vocab_size=151936, hidden_size=1536, num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
            max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True))),
}

# Students' layers where 2 do not fit this box beside the teacher (docstring).
STUDENT_LAYERS = {"paper-llama": 1}

pytestmark = [pytest.mark.slow, pytest.mark.paper]


def save_random(model_class, config, tokenizer, out_dir: Path, layers: int, seed: int) -> int:
    """A random model of `config`'s widths and `layers` layers as a pretrained-model directory with `tokenizer`; returns its
    embedding rows. Built on the meta device and filled once with N(0, 0.02), norms 1, biases 0 (transformers' own
    initialisation takes tens of seconds at these widths), stored in bf16 to halve the write."""
    config.num_hidden_layers = layers
    if isinstance(config, Qwen2Config):  # its per-layer attention types were fixed at construction, one per layer
        config.layer_types = config.layer_types[:layers]
    config.bos_token_id = config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    with torch.device("meta"):
        model = model_class(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, 0.02, generator=generator)
            elif name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    model.tie_weights()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model.get_output_embeddings().weight.shape[0]


@pytest.mark.parametrize("config_name", list(FAMILIES))
def test_family_config_runs_end_to_end_at_real_widths(tmp_path, config_name):
    workdir = tmp_path / "repo"
    workdir.mkdir()
    copy_sources(workdir)
    (workdir / "reports").mkdir(exist_ok=True)
    config = yaml.safe_load((REPO / "configs" / f"{config_name}.yaml").read_text())
    dryrun = yaml.safe_load(DRYRUN_OVERLAY.read_text())
    del dryrun["models"]
    params = deep_merge(config, dryrun)
    student, student_spec = next(iter(config["models"]["students"].items()))
    params["models"] = {
        "teacher": {"label": config["models"]["teacher"]["label"], "name_or_path": "dryrun/teacher", "arch": None},
        "students": {student: student_spec | {"name_or_path": f"dryrun/{student}"}},
    }
    if config_name == "qwen":
        params["engine"]["lora"] = LORA_ADAPTER
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    [seed] = params["train_seeds"]

    tokenizer_size, (teacher_class, teacher_config), (student_class, student_config) = FAMILIES[config_name]
    records, documents = dryrun_texts()
    write_jsonl(workdir / params["data"]["jsonl_path"], records)
    write_jsonl(workdir / params["data"]["pretrain"]["path"], [{"text": d} for d in documents])
    texts = [build_prompt(r["instruction"], r["context"]) + r["response"] for r in records] + documents
    tokenizer = gpt2_layout_tokenizer(texts, tokenizer_size)
    assert len(tokenizer) == tokenizer_size
    teacher_rows = save_random(teacher_class, teacher_config, tokenizer, workdir / "dryrun" / "teacher", layers=1, seed=0)
    student_layers = STUDENT_LAYERS.get(config_name, 2)
    student_rows = save_random(student_class, student_config, tokenizer, workdir / "dryrun" / student, student_layers, seed=1)

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
    run([*git, "commit", "-qm", f"{config_name} dry run"], workdir, env)

    repro = run(["dvc", "repro"], workdir, env)
    stages = run(["dvc", "stage", "list", "--name-only"], workdir, env).stdout.split()
    for stage in stages:
        assert f"Running stage '{stage}'" in repro.stdout, stage
    lock = yaml.safe_load((workdir / "dvc.lock").read_text())["stages"]
    assert set(lock) == set(stages)
    if teacher_rows > tokenizer_size or student_rows > tokenizer_size:  # OPT, Qwen: the padded rows were cut
        assert f"vocabulary padded to {max(teacher_rows, student_rows)} rows" in repro.stdout
    engine = lock[f"distill_minillm@{student}-{seed}"]["params"]["params.yaml"]["engine"]
    assert (engine["zero_stage"], engine["gradient_checkpointing"]) == (2, True)
    assert engine["teacher_precision"] == config["engine"]["teacher_precision"]
    for metrics_file in sorted((workdir / "metrics").rglob("*.json")):
        assert finite_numbers(json.loads(metrics_file.read_text())), metrics_file
    for method in ("minillm", "gkd", "distillm", "opd", "kd", "seqkd", "sft_long"):
        model_dir = workdir / "models" / student / f"seed{seed}" / method / "model"
        saved = json.loads((model_dir / "config.json").read_text())
        assert (saved["hidden_size"], saved["vocab_size"]) == (student_config.hidden_size, tokenizer_size), method
        assert not (model_dir / "adapter_config.json").exists()  # LoRA is saved merged
    assert json.loads((workdir / "metrics" / "distill" / "minillm" / f"{student}-seed{seed}.json").read_text())["steps"] == 2
    assert "MiniLLM" in (workdir / "reports" / "table1.md").read_text()

    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kilobytes on Linux
    print(f"{config_name} dry run: peak RSS of one stage {peak_rss / 2**30:.1f} GiB")
    assert peak_rss < MAX_RSS_BYTES
