"""The DeepSpeed engine (spec §2, §8): global-token loss normalisation under gradient accumulation and data
parallelism, checked against a plain-PyTorch step on the whole global batch; schedules; weight-decay groups."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from deepspeed import DeepSpeedEngine

from pipeline import engine
from pipeline.config import ConfigError, EngineConfig, Optimizer
from pipeline.data import sft_batch
from tests import ddp_worker
from tests.ddp_worker import GLOBAL_BATCH, PAD_TOKEN_ID, STEPS, step_indices, tiny_model, tiny_optimizer, tiny_split

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never reached by the gradient norm (about 1 here): the run is unclipped, so AdamW's first moment keeps
# the gradient's scale and shows a wrong normalisation constant.
CLIP_OFF = 1000.0
# Below every step's gradient norm: the clipped path is exercised.
CLIP_ON = 0.1
PARAMETER_ATOL = 1e-5
MOMENT_ATOL = 1e-7


@pytest.fixture(scope="module")
def single_process() -> tuple[EngineConfig, engine.Dist]:
    config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    return config, engine.setup(config)


def is_no_decay(name: str) -> bool:
    """Spec §2 by name: biases and LayerNorm weights (GPT-2 names its LayerNorms ln_1, ln_2, ln_f)."""
    return name.endswith(".bias") or ".ln_" in name


def reference_training(grad_clip: float) -> dict:
    """What the engine must compute: per step, one backward of the token-mean CE over the whole global batch,
    clip, AdamW with the hand-written cosine learning rate."""
    model = tiny_model()
    split = tiny_split()
    optimizer_config = tiny_optimizer(grad_clip)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not is_no_decay(n)], "weight_decay": optimizer_config.weight_decay},
            {"params": [p for n, p in named if is_no_decay(n)], "weight_decay": 0.0},
        ],
        lr=optimizer_config.lr,
        betas=optimizer_config.betas,
    )
    gradient_norms = []
    for step in range(STEPS):
        lr, min_lr = optimizer_config.lr, optimizer_config.min_lr
        for group in optimizer.param_groups:
            group["lr"] = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        batch = sft_batch(split, step_indices(step), PAD_TOKEN_ID)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        gradient_norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
        optimizer.step()
    return {
        "parameters": {n: p.detach().clone() for n, p in named},
        "exp_avg": {n: optimizer.state[p]["exp_avg"].clone() for n, p in named},
        "gradient_norms": gradient_norms,
    }


@pytest.fixture(scope="module")
def references() -> dict[float, dict]:
    return {grad_clip: reference_training(grad_clip) for grad_clip in (CLIP_OFF, CLIP_ON)}


def engine_result(model_engine: DeepSpeedEngine) -> dict:
    named = list(model_engine.module.named_parameters())
    return {
        "parameters": {n: p.detach().clone() for n, p in named},
        "exp_avg": {n: model_engine.optimizer.state[p]["exp_avg"].clone() for n, p in named},
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[name] - b[name]).abs().max()) for name in a)


def test_reference_clipping_regimes_are_the_ones_intended(references):
    assert all(norm < CLIP_OFF for norm in references[CLIP_OFF]["gradient_norms"])
    assert all(norm > 2 * CLIP_ON for norm in references[CLIP_ON]["gradient_norms"])


@pytest.mark.parametrize("grad_clip", [CLIP_OFF, CLIP_ON])
@pytest.mark.parametrize("micro_batch", [8, 2, 1])  # gradient accumulation 1, 4, 8
def test_accumulation_reaches_the_one_big_batch_reference(single_process, references, micro_batch, grad_clip):
    config, dist_info = single_process
    model_engine = ddp_worker.train(tiny_model(), tiny_optimizer(grad_clip), micro_batch, config, dist_info)
    assert model_engine.gradient_accumulation_steps() == GLOBAL_BATCH // micro_batch
    result = engine_result(model_engine)
    assert max_difference(result["parameters"], references[grad_clip]["parameters"]) < PARAMETER_ATOL
    assert max_difference(result["exp_avg"], references[grad_clip]["exp_avg"]) < MOMENT_ATOL


def test_per_micro_batch_token_mean_does_not_reach_the_reference(single_process, references):
    """Negative control: the naive normalisation, through the same loop, is caught by the comparison above."""
    config, dist_info = single_process
    model_engine = ddp_worker.train(
        tiny_model(), tiny_optimizer(CLIP_OFF), 2, config, dist_info, per_micro_batch_mean=True
    )
    result = engine_result(model_engine)
    assert max_difference(result["parameters"], references[CLIP_OFF]["parameters"]) > 10 * PARAMETER_ATOL
    assert max_difference(result["exp_avg"], references[CLIP_OFF]["exp_avg"]) > 100 * MOMENT_ATOL


def child_environment() -> dict[str, str]:
    """engine.setup wrote this process's single-rank rendezvous into os.environ; children need their own."""
    rendezvous = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in rendezvous}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_worker(num_procs: int, micro_batch: int, out: Path) -> dict:
    # An empty extension directory of its own: the ranks must train, ZeRO 1-2 included, without JIT-building an op.
    extensions = out.with_suffix(".torch_extensions")
    extensions.mkdir()
    env = child_environment() | {"PYTHONPATH": str(REPO_ROOT), "TORCH_EXTENSIONS_DIR": str(extensions)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_procs}",
        str(REPO_ROOT / "tests" / "ddp_worker.py"), "--micro-batch", str(micro_batch),
        "--zero-stages", "0", "1", "2", "--grad-clips", str(CLIP_OFF), str(CLIP_ON), "--out", str(out),
    ]  # fmt: skip
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert not any(extensions.iterdir()), f"an op was built: {sorted(p.name for p in extensions.iterdir())}"
    return torch.load(out)


@pytest.mark.slow
def test_two_processes_reach_the_same_parameters_as_one(tmp_path, references):
    """Global batch 8 as 2 ranks x micro 2 x accumulation 2 and as 1 rank x micro 2 x accumulation 4."""
    two = run_worker(num_procs=2, micro_batch=2, out=tmp_path / "two.pt")
    one = run_worker(num_procs=1, micro_batch=2, out=tmp_path / "one.pt")
    for zero_stage in (0, 1, 2):
        for grad_clip in (CLIP_OFF, CLIP_ON):
            key = (zero_stage, grad_clip)
            for kind in ("parameters", "exp_avg"):
                atol = PARAMETER_ATOL if kind == "parameters" else MOMENT_ATOL
                assert max_difference(two[key][kind], one[key][kind]) < atol, (key, kind)
                assert max_difference(two[key][kind], references[grad_clip][kind]) < atol, (key, kind)


@pytest.mark.slow
def test_a_stage_run_as_a_module_relaunches_itself_on_every_rank(tmp_path):
    """DVC runs `python -m stages.x`; the relaunched ranks must import pipeline without any PYTHONPATH."""
    env = child_environment()
    env.pop("PYTHONPATH", None)
    command = [sys.executable, "-m", "tests.ddp_relaunch_probe", str(tmp_path), "--start", "models/tiny/sft"]
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0", "rank1"]
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "2 models/tiny/sft"


def test_cosine_schedule_without_warmup_by_hand():
    parameter = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([parameter], lr=1.0)
    config = Optimizer(lr=1.0, min_lr=0.1, weight_decay=0.0, grad_clip=1.0, schedule="cosine", warmup_steps=0)
    schedule = engine.build_schedule(sgd, config, total_steps=4)
    rates = []
    for _ in range(6):
        rates.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    # 0.1 + 0.9 * (1 + cos(pi * t / 4)) / 2, with cos(pi/4) = sqrt(1/2); held at min_lr after the end.
    expected = [1.0, 0.1 + 0.45 * (1 + 0.5**0.5), 0.55, 0.1 + 0.45 * (1 - 0.5**0.5), 0.1, 0.1]
    assert rates == pytest.approx(expected, abs=1e-12)


def test_constant_schedule_after_linear_warmup_by_hand():
    parameter = torch.nn.Parameter(torch.zeros(1))
    sgd = torch.optim.SGD([parameter], lr=2.0)
    config = Optimizer(lr=2.0, min_lr=0.0, weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_steps=4)
    schedule = engine.build_schedule(sgd, config, total_steps=10)
    rates = []
    for _ in range(10):
        rates.append(schedule.get_last_lr()[0])
        sgd.step()
        schedule.step()
    assert rates == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], abs=1e-12)


def test_biases_and_layernorm_weights_get_no_weight_decay():
    model = tiny_model()
    config = tiny_optimizer(grad_clip=1.0)
    optimizer = engine.build_optimizer(model, config)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay_by_name = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert name_of[id(parameter)] not in decay_by_name, "a parameter is in two groups"
            decay_by_name[name_of[id(parameter)]] = group["weight_decay"]
    assert decay_by_name.keys() == set(name_of.values())
    assert decay_by_name == {name: 0.0 if is_no_decay(name) else config.weight_decay for name in name_of.values()}
    # Spot checks by hand, so that a wrong is_no_decay cannot make the test pass.
    assert decay_by_name["transformer.h.0.ln_1.weight"] == 0.0
    assert decay_by_name["transformer.ln_f.weight"] == 0.0
    assert decay_by_name["transformer.h.0.attn.c_attn.bias"] == 0.0
    assert decay_by_name["transformer.h.0.mlp.c_fc.weight"] == 0.1
    assert decay_by_name["transformer.wte.weight"] == 0.1


def test_accumulation_steps_divides_or_names_the_key():
    assert engine.accumulation_steps(32, 4, 2, "sft") == 4
    assert engine.accumulation_steps(8, 8, 1, "sft") == 1
    with pytest.raises(ConfigError, match=r"sft\.batch_size \(10\)"):
        engine.accumulation_steps(10, 4, 1, "sft")
    with pytest.raises(ConfigError, match=r"kd\.batch_size \(8\)"):
        engine.accumulation_steps(8, 2, 3, "kd")


LEFT_BY_A_KILLED_BUILD = """
import os, sys
from pipeline import engine
from pipeline.config import EngineConfig, Optimizer
from tests.ddp_worker import tiny_model
config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
engine.setup(config)
optimizer = Optimizer(lr=1e-3, min_lr=1e-4, weight_decay=0.0, grad_clip=1.0, schedule="cosine", warmup_steps=0)
engine.initialize(tiny_model(), optimizer, total_steps=2, micro_batch=1, grad_accum=1, engine=config)
print("engine ready")
"""


def test_a_lock_left_by_a_killed_op_build_does_not_stop_the_next_stage(tmp_path):
    """Issue 15: DeepSpeed JIT-built its CPU shm op under torch's extension lock; a stage killed during that build left
    the lock (and a half-built directory), and every later stage waited on it forever, printing nothing. Here that
    state is planted in a fresh extension directory, lock one second old, as a kill leaves it: a stage must set up
    DeepSpeed without waiting and without building anything. With the op still loaded, this times out."""
    build_dir = tmp_path / "deepspeed_shm_comm"
    build_dir.mkdir()
    (build_dir / "lock").touch()
    (build_dir / "build.ninja").write_text("# half-written by a killed build\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    env = child_environment() | {"TORCH_EXTENSIONS_DIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run([sys.executable, "-c", LEFT_BY_A_KILLED_BUILD], env=env, cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "engine ready" in completed.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == before, "nothing is built or touched"
