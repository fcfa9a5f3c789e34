"""The three recipes (pipeline/pretrain.py, sft.py, minillm.py) in this process on micro models, in seconds: an
interrupted run resumed from its checkpoint ends bit-identical to an uninterrupted one, at every kind of position
(mid-epoch, epoch boundary, MiniLLM's round boundary); and the checkpoint picked is the best by validation.

The interruption is an exception raised right after a checkpoint is written, which is what a kill then leaves
behind. tests/test_resume.py kills the real stage processes (SIGKILL, also mid-write) as the end-to-end proof.
"""

import copy
import math

import pytest
import torch

from pipeline import checkpoint, data, engine, synthetic
from pipeline.config import (
    Architecture,
    CheckpointConfig,
    DistiLLMMethod,
    EngineConfig,
    GKDMethod,
    MiniLLMMethod,
    Optimizer,
    PretrainStage,
    SFTStage,
)
from pipeline.cost import BudgetCheckpoint
from pipeline.distillm import train_distillm
from pipeline.evaluation import evaluate_rouge_l
from pipeline.gkd import train_gkd
from pipeline.minillm import train_minillm
from pipeline.models import build_causal_lm
from pipeline.pretrain import train_lm
from pipeline.sft import train_sft

TIMING = {"tokens_per_s", "train_tokens_per_s", "rollout_tokens_per_s", "wall_time_s"}
CHECKPOINTS = CheckpointConfig(every_steps=2, max_nonfinite_skips=0)


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def world():
    """A tokenizer, splits and micro teacher and student, built once."""
    suite = synthetic.build_suite(7, 48, 6, 1)
    texts = [data.build_prompt(r["instruction"], r["context"]) + r["response"] for r in suite["train"]]
    tokenizer = data.train_bpe_tokenizer(texts, 300)
    train_split, _, _ = data.tokenize_records(tokenizer, suite["train"], 160, 128)
    valid_split, valid_records, _ = data.tokenize_records(tokenizer, suite["valid"], 160, 128)
    engine_config = EngineConfig(num_procs=1, launcher="torchrun", device="cpu", precision="fp32", zero_stage=0)
    dist = engine.setup(engine_config)
    torch.manual_seed(0)
    teacher = build_causal_lm(Architecture(n_layer=1, n_embd=32, n_head=2), len(tokenizer), 192, tokenizer.eos_token_id)
    student = build_causal_lm(Architecture(n_layer=1, n_embd=16, n_head=2), len(tokenizer), 192, tokenizer.eos_token_id)
    blocks = torch.from_numpy(data.pack_pretrain_blocks(tokenizer, texts, 32).astype("int64"))
    return {"tokenizer": tokenizer, "train": train_split, "valid": valid_split, "records": valid_records,
            "engine": engine_config, "dist": dist, "teacher": teacher.eval().requires_grad_(False), "student": student,
            "blocks": blocks}


def optimizer(lr: float, schedule: str = "cosine") -> Optimizer:
    return Optimizer(lr=lr, min_lr=lr / 10, weight_decay=0.01, grad_clip=1.0, schedule=schedule, warmup_steps=1)


def run_recipe(recipe, world, name: str, interrupt_at: int | None, tamper=None, **kwargs):
    """Run `recipe` as its stage would: resume from scratch/<name> when a checkpoint is there. With `interrupt_at`,
    stop right after that step's checkpoint is written; `tamper(loop_state)` edits what a resume loads."""
    dist = world["dist"]
    resume = checkpoint.find(name, "fingerprint", dist)
    checkpointer = checkpoint.Checkpointer(name, "fingerprint", CHECKPOINTS, dist, resume, run_id=None)
    if tamper is not None:
        load = checkpointer.load

        def load_then_tamper(model_engine):
            loop_state, rank_state = load(model_engine)
            tamper(loop_state)
            return loop_state, rank_state

        checkpointer.load = load_then_tamper
    if interrupt_at is not None:
        save = checkpointer.save

        def save_then_stop(model_engine, step, loop_state, rank_state):
            save(model_engine, step, loop_state, rank_state)
            if step == interrupt_at:
                raise Interrupted

        checkpointer.save = save_then_stop
    logged = []
    try:
        result = recipe(dist=dist, engine_config=world["engine"], checkpointer=checkpointer,
                        log_metrics=lambda metrics, step=None: logged.append((step, dict(metrics))), **kwargs)
    except Interrupted:
        return None, logged
    checkpointer.finish()
    return result, logged


def comparable(value):
    """The value with wall-clock figures left out (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: comparable(v) for k, v in value.items() if k not in TIMING and not k.endswith("tokens_per_s")}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        return comparable(vars(value))
    return value


def uninterrupted_and_resumed(recipe, world, name, interrupt_at, fresh_kwargs, tamper=None):
    """(the result of one uninterrupted run, the result of a run stopped at `interrupt_at` then resumed), each from
    the same fresh models (fresh_kwargs() builds them)."""
    torch.manual_seed(1)
    reference, _ = run_recipe(recipe, world, name, None, **fresh_kwargs())
    torch.manual_seed(1)
    stopped, _ = run_recipe(recipe, world, name, interrupt_at, **fresh_kwargs())
    assert stopped is None
    torch.manual_seed(2)  # a resumed process starts with other RNG states: the checkpoint must restore them
    resumed, logged = run_recipe(recipe, world, name, None, tamper, **fresh_kwargs())
    assert min(step for step, _ in logged if step) == interrupt_at + 1  # it did resume, not restart
    return reference, resumed


MINILLM = dict(
    steps=10, rollouts_per_round=8, inner_epochs=2, batch_size=2, micro_batch_size=1, max_new_tokens=6, teacher_mix=0.2,
    max_importance_weight=None, reward_scale=1.0, reward_clip=100.0, returns="paper", gamma=0.95, length_normalized=True,
    whiten_advantages=True, clip_eps=0.2, single_step=True, pt_coef=1.0, pt_batch_size=2, pt_teacher_kd_ratio=0.0,
    optimizer=optimizer(2e-3, "constant").model_dump(), eval_every=3, eval_max_new_tokens=6,
)


# 4 mini-batches per inner epoch, 2 inner epochs: step 2 is mid-epoch, 4 an epoch boundary, 8 a round boundary.
@pytest.mark.parametrize("interrupt_at", [2, 4, 8], ids=["mid-epoch", "epoch-boundary", "round-boundary"])
def test_minillm_resumes_bit_identically(world, tmp_path, monkeypatch, interrupt_at):
    monkeypatch.chdir(tmp_path)
    config = MiniLLMMethod.model_validate(MINILLM)

    def fresh():
        rollouts = tmp_path / "rollouts"
        rollouts.mkdir(exist_ok=True)
        return dict(student=copy.deepcopy(world["student"]), teacher=world["teacher"], tokenizer=world["tokenizer"],
                    train_prompts=world["train"].prompts(), pt_blocks=world["blocks"], valid_records=world["records"],
                    config=config, seed=3, rollout_dir=rollouts)

    reference, resumed = uninterrupted_and_resumed(train_minillm, world, "minillm_test", interrupt_at, fresh)
    assert comparable(resumed) == comparable(reference)
    assert len(reference.train_curve) == 10 and reference.generated_tokens > 0
    # Kept by validation: the best of the validation curve, and its weights.
    assert reference.best_rouge_l == max(point["valid_rouge_l"] for point in reference.valid_curve)


def test_the_official_codes_whitening_and_single_step_reach_the_update(world, tmp_path, monkeypatch):
    """whitening: official_micro_batch and single_step_weighted: false change the first step's loss parts from the
    same first rollout (each switch its own part), and train to the end."""
    monkeypatch.chdir(tmp_path)
    variants = {"paper": {}, "official_whitening": {"whitening": "official_micro_batch"},
                "unweighted_single_step": {"single_step_weighted": False}}
    first_steps = {}
    for name, overrides in variants.items():
        config = MiniLLMMethod.model_validate(MINILLM | {"steps": 2} | overrides)
        (tmp_path / name).mkdir()
        torch.manual_seed(1)
        result, _ = run_recipe(train_minillm, world, f"minillm_{name}", None, student=copy.deepcopy(world["student"]),
                               teacher=world["teacher"], tokenizer=world["tokenizer"],
                               train_prompts=world["train"].prompts(), pt_blocks=world["blocks"],
                               valid_records=world["records"], config=config, seed=3, rollout_dir=tmp_path / name)
        assert len(result.train_curve) == 2
        first_steps[name] = result.train_curve[0]
    paper = first_steps["paper"]
    for name in variants:
        assert first_steps[name]["rollout_reward_mean"] == paper["rollout_reward_mean"]  # the same rollout
    whitened, unweighted = first_steps["official_whitening"], first_steps["unweighted_single_step"]
    assert whitened["loss_long_term"] != paper["loss_long_term"] and whitened["loss_single_step"] == paper["loss_single_step"]
    assert unweighted["loss_single_step"] != paper["loss_single_step"] and unweighted["loss_long_term"] == paper["loss_long_term"]


def test_negative_control_a_resume_at_the_wrong_mini_batch_differs(world, tmp_path, monkeypatch):
    """The comparison above can fail: resuming MiniLLM one mini-batch later than it stopped changes the weights."""
    monkeypatch.chdir(tmp_path)
    config = MiniLLMMethod.model_validate(MINILLM | {"steps": 4})

    def fresh():
        rollouts = tmp_path / "rollouts"
        rollouts.mkdir(exist_ok=True)
        return dict(student=copy.deepcopy(world["student"]), teacher=world["teacher"], tokenizer=world["tokenizer"],
                    train_prompts=world["train"].prompts(), pt_blocks=world["blocks"], valid_records=world["records"],
                    config=config, seed=3, rollout_dir=rollouts)

    def skip_a_mini_batch(loop_state):
        round_index, inner_epoch, first_batch = loop_state["position"]
        loop_state["position"] = (round_index, inner_epoch, first_batch + 1)

    reference, resumed = uninterrupted_and_resumed(train_minillm, world, "minillm_control", 2, fresh, skip_a_mini_batch)
    assert comparable(resumed.best_state) != comparable(reference.best_state) or (
        comparable(resumed.train_curve) != comparable(reference.train_curve))


@pytest.mark.parametrize("interrupt_at", [2, 4], ids=["mid-epoch", "epoch-boundary"])
def test_sft_resumes_bit_identically_and_keeps_the_best_by_validation(world, tmp_path, monkeypatch, interrupt_at):
    monkeypatch.chdir(tmp_path)
    stage = SFTStage(epochs=2, batch_size=8, micro_batch_size=4, optimizer=optimizer(2e-3), eval_every=2,
                     eval_max_new_tokens=6)

    def fresh():
        return dict(model=copy.deepcopy(world["student"]), tokenizer=world["tokenizer"], train_split=world["train"],
                    valid_split=world["valid"], valid_records=world["records"], stage=stage, stage_key="sft_test", seed=3)

    reference, resumed = uninterrupted_and_resumed(train_sft, world, "sft_test", interrupt_at, fresh)
    assert comparable(resumed) == comparable(reference)
    assert len(reference.train_curve) == 2 * (len(world["train"]) // 8)
    assert reference.best_loss == min(point["valid_loss"] for point in reference.valid_curve)
    assert reference.best_rouge_l == max(point["valid_rouge_l"] for point in reference.valid_curve)


def test_sft_for_a_number_of_steps_runs_them_across_epochs_and_resumes(world, tmp_path, monkeypatch):
    """The longer-SFT control's `steps` (instead of epochs): one epoch and 3 more steps, killed in the second epoch."""
    monkeypatch.chdir(tmp_path)
    per_epoch = len(world["train"]) // 8
    stage = SFTStage(steps=per_epoch + 3, batch_size=8, micro_batch_size=4, optimizer=optimizer(2e-3), eval_every=2,
                     eval_max_new_tokens=6)

    def fresh():
        return dict(model=copy.deepcopy(world["student"]), tokenizer=world["tokenizer"], train_split=world["train"],
                    valid_split=world["valid"], valid_records=world["records"], stage=stage, stage_key="sft_steps", seed=3)

    reference, resumed = uninterrupted_and_resumed(train_sft, world, "sft_steps", per_epoch + 2, fresh)
    assert comparable(resumed) == comparable(reference)
    assert [point["step"] for point in reference.train_curve] == list(range(1, per_epoch + 4))


def test_pretraining_resumes_bit_identically(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = PretrainStage(steps=6, batch_size=4, micro_batch_size=2, optimizer=optimizer(1e-3))

    def fresh():
        return dict(model=copy.deepcopy(world["student"]), blocks=world["blocks"], config=config, seed=3, progress="pt")

    reference, resumed = uninterrupted_and_resumed(train_lm, world, "pretrain_test", 4, fresh)
    assert comparable(resumed) == comparable(reference)
    assert len(reference.losses) == 6 and all(math.isfinite(loss) for loss in reference.losses)


STUDENT_DATA = dict(steps=8, batch_size=4, micro_batch_size=2, max_new_tokens=6, optimizer=optimizer(2e-3, "constant"),
                    eval_every=2, eval_max_new_tokens=6)


@pytest.mark.parametrize("method", ["gkd", "distillm"])
def test_gkd_and_distillm_resume_bit_identically(world, tmp_path, monkeypatch, method):
    """Interrupted at step 4, with student samples in the mix (and, for DistiLLM, a replay buffer that is full and
    replayed from): the resumed run ends where the uninterrupted one did."""
    monkeypatch.chdir(tmp_path)
    if method == "gkd":
        config = GKDMethod(**STUDENT_DATA, on_policy_fraction=0.5, beta=0.5, temperature=0.9, loss_temperature=1.0,
                           seq_kd=False)
        recipe = train_gkd
    else:
        config = DistiLLMMethod(**STUDENT_DATA, divergence="skew_reverse_kl", alpha=0.1, initial_student_share=0.8,
                                share_increment=0.1, loss_increase=0.0, adapt_every=2, replay_capacity=8,
                                fresh_schedule="decreasing")
        recipe = train_distillm

    def fresh():
        return dict(student=copy.deepcopy(world["student"]), teacher=world["teacher"], tokenizer=world["tokenizer"],
                    train_split=world["train"], valid_split=world["valid"], valid_records=world["records"],
                    config=config, seed=5)

    reference, resumed = uninterrupted_and_resumed(recipe, world, f"{method}_test", 4, fresh)
    assert comparable(resumed) == comparable(reference)
    assert len(reference.train_curve) == 8 and reference.student_batches > 0 and reference.generated_tokens > 0
    assert reference.best_rouge_l == max(point["valid_rouge_l"] for point in reference.valid_curve)
    if method == "distillm":
        fills = [point["train_buffer_fill"] for point in reference.train_curve]
        assert fills[-1] == 8  # the buffer filled up (2 fresh batches of 4), so later SGO steps could replay


def budget_for(model, fraction_of: float, start_flops: float = 0.0) -> BudgetCheckpoint:
    return BudgetCheckpoint(budget_flops=fraction_of, start_flops=start_flops,
                            student_parameters=sum(p.numel() for p in model.parameters()), teacher_parameters=10_000)


def check_kept_within_budget(result, best_state: dict) -> None:
    """The budget's checkpoint is Table 1's rule truncated at the budget: the best validation made before the first
    one past it (validation ties keep the first), with its weights."""
    budget = result.budget
    steps = [point["step"] for point in result.valid_curve]
    assert budget.exceeded_at_step in steps
    before = [point["valid_rouge_l"] for point in result.valid_curve if point["step"] < budget.exceeded_at_step]
    assert budget.valid_rouge_l == (max(before) if before else None)
    if before and max(before) == result.best_rouge_l:
        assert comparable(budget.state) == comparable(best_state)  # nothing after the budget beat it


def test_sft_keeps_the_best_validated_checkpoint_within_the_flops_budget_and_resumes_with_it(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = SFTStage(epochs=2, batch_size=8, micro_batch_size=4, optimizer=optimizer(2e-3), eval_every=2,
                     eval_max_new_tokens=6)

    def fresh(budget_flops):
        model = copy.deepcopy(world["student"])
        return lambda: dict(model=copy.deepcopy(model), tokenizer=world["tokenizer"], train_split=world["train"],
                            valid_split=world["valid"], valid_records=world["records"], stage=stage,
                            stage_key="sft_budget", seed=3, budget=budget_for(model, budget_flops))

    torch.manual_seed(1)
    unlimited, _ = run_recipe(train_sft, world, "sft_budget", None, **fresh(math.inf)())
    assert unlimited.budget.exceeded_at_step is None and unlimited.budget.state is None
    total = unlimited.budget.summary()["run_flops"]
    assert total == 6 * unlimited.budget.student_parameters * unlimited.response_tokens_trained
    assert unlimited.budget.summary()["kept"] == "the Table 1 model"
    # Half the run's FLOPs: a validation in the middle is the first past the budget; resumed, the same is kept.
    reference, resumed = uninterrupted_and_resumed(train_sft, world, "sft_budget", 4, fresh(total / 2))
    assert comparable(resumed) == comparable(reference)
    check_kept_within_budget(reference, reference.best_rouge_state)
    assert 0 < reference.budget.exceeded_at_step < reference.valid_curve[-1]["step"]
    kept = copy.deepcopy(world["student"])
    kept.load_state_dict(reference.budget.state)
    assert evaluate_rouge_l(kept, world["tokenizer"], world["records"], seed=3, max_new_tokens=6,
                            batch_size=64) == reference.budget.valid_rouge_l  # the weights are the validated ones
    # A budget below the first validation's FLOPs: nothing validated within it, the start is kept.
    torch.manual_seed(1)
    early, _ = run_recipe(train_sft, world, "sft_budget", None, **fresh(1.0)())
    assert early.budget.exceeded_at_step == 2 and early.budget.state == {} and early.budget.valid_rouge_l is None
    assert early.budget.summary()["kept"] == "the start"


def test_minillm_and_gkd_keep_their_checkpoint_within_the_budget_across_a_resume(world, tmp_path, monkeypatch):
    """The start counts (start_flops, e.g. the SFT init's): step 0's validation is within the budget."""
    monkeypatch.chdir(tmp_path)
    config = MiniLLMMethod.model_validate(MINILLM)

    def fresh_minillm():
        rollouts = tmp_path / "rollouts"
        rollouts.mkdir(exist_ok=True)
        student = copy.deepcopy(world["student"])
        return dict(student=student, teacher=world["teacher"], tokenizer=world["tokenizer"],
                    train_prompts=world["train"].prompts(), pt_blocks=world["blocks"], valid_records=world["records"],
                    config=config, seed=3, rollout_dir=rollouts, budget=budget_for(student, 5e7, start_flops=4e7))

    reference, resumed = uninterrupted_and_resumed(train_minillm, world, "minillm_budget", 4, fresh_minillm)
    assert comparable(resumed) == comparable(reference)
    check_kept_within_budget(reference, reference.best_state)
    assert reference.budget.spent(0, 0, 0) == 4e7 and reference.budget.exceeded_at_step > 0
    # The PT loss (pt_coef 1) trains 2 blocks of 32 tokens (31 predicted) per step for 10 steps: trained tokens too.
    assert reference.pt_tokens_trained == 10 * 2 * 31 and reference.skipped_steps == 0
    assert reference.budget.summary()["run_flops"] == reference.budget.spent(
        reference.response_tokens_trained + reference.pt_tokens_trained, reference.generated_tokens,
        reference.teacher_forward_tokens)

    gkd = GKDMethod(**STUDENT_DATA, on_policy_fraction=0.5, beta=0.5, temperature=0.9, loss_temperature=1.0, seq_kd=False)

    def fresh_gkd():
        student = copy.deepcopy(world["student"])
        return dict(student=student, teacher=world["teacher"], tokenizer=world["tokenizer"], train_split=world["train"],
                    valid_split=world["valid"], valid_records=world["records"], config=gkd, seed=5,
                    budget=budget_for(student, 4.5e7, start_flops=4e7))

    reference, resumed = uninterrupted_and_resumed(train_gkd, world, "gkd_budget", 4, fresh_gkd)
    assert comparable(resumed) == comparable(reference)
    check_kept_within_budget(reference, reference.best_state)
    assert reference.budget.exceeded_at_step > 0


@pytest.mark.parametrize(("teacher_family", "student_family"), [("llama", "qwen2"), ("qwen2", "opt"), ("opt", "llama")])
def test_minillm_and_gkd_train_and_resume_on_every_family(world, tmp_path, monkeypatch, teacher_family, student_family):
    """Teacher and student of other families than GPT-2's (each family once as teacher and once as student): MiniLLM,
    with its PT loss, and GKD train through the transformers-cache sampler and the fused LM-head losses, and a run
    interrupted at step 4 resumes to the uninterrupted run's result."""
    monkeypatch.chdir(tmp_path)
    tokenizer = world["tokenizer"]
    torch.manual_seed(0)
    teacher = build_causal_lm(Architecture(family=teacher_family, n_layer=1, n_embd=32, n_head=4), len(tokenizer), 192,
                              tokenizer.eos_token_id).eval().requires_grad_(False)
    student = build_causal_lm(Architecture(family=student_family, n_layer=1, n_embd=16, n_head=2), len(tokenizer), 192,
                              tokenizer.eos_token_id)
    config = MiniLLMMethod.model_validate(MINILLM)

    def fresh_minillm():
        rollouts = tmp_path / "rollouts"
        rollouts.mkdir(exist_ok=True)
        return dict(student=copy.deepcopy(student), teacher=teacher, tokenizer=tokenizer,
                    train_prompts=world["train"].prompts(), pt_blocks=world["blocks"], valid_records=world["records"],
                    config=config, seed=3, rollout_dir=rollouts)

    reference, resumed = uninterrupted_and_resumed(train_minillm, world, "minillm_family", 4, fresh_minillm)
    assert comparable(resumed) == comparable(reference)
    assert len(reference.train_curve) == 10 and reference.generated_tokens > 0
    assert all(math.isfinite(point["loss_total"]) and 0 < point["train_grad_norm"] < math.inf
               for point in reference.train_curve)

    gkd = GKDMethod(**STUDENT_DATA, on_policy_fraction=0.5, beta=0.5, temperature=0.9, loss_temperature=1.0, seq_kd=False)

    def fresh_gkd():
        return dict(student=copy.deepcopy(student), teacher=teacher, tokenizer=tokenizer, train_split=world["train"],
                    valid_split=world["valid"], valid_records=world["records"], config=gkd, seed=5)

    reference, resumed = uninterrupted_and_resumed(train_gkd, world, "gkd_family", 4, fresh_gkd)
    assert comparable(resumed) == comparable(reference)
    assert reference.student_batches > 0
    assert all(math.isfinite(point["loss_divergence"]) and 0 < point["train_grad_norm"] < math.inf
               for point in reference.train_curve)


def test_lora_minillm_changes_only_adapters_resumes_and_saves_a_merged_model_that_reloads_and_evaluates(
        world, tmp_path, monkeypatch):
    """engine.lora (with gradient checkpointing, as the official LLaMA LoRA script runs) on a tiny Llama student:
    MiniLLM moves the adapters and no other weight, a run interrupted at step 4 resumes to the uninterrupted result,
    and the saved model is a plain Llama with the adapters merged: it reloads with the trained model's logits, samples
    through our own decoder, and evaluates."""
    from pipeline.config import LoRA
    from pipeline.generation import LlamaDecoder, fast_decoder
    from pipeline.models import has_adapters, load_model, save_checkpoint

    monkeypatch.chdir(tmp_path)
    tokenizer = world["tokenizer"]
    torch.manual_seed(0)
    student = build_causal_lm(Architecture(family="llama", n_layer=1, n_embd=16, n_head=2), len(tokenizer), 192,
                              tokenizer.eos_token_id)
    start = {name: weight.clone() for name, weight in student.state_dict().items()}
    lora = LoRA(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    lora_world = world | {"engine": world["engine"].model_copy(update={"lora": lora, "gradient_checkpointing": True})}
    config = MiniLLMMethod.model_validate(MINILLM)
    trained = []

    def fresh():
        rollouts = tmp_path / "rollouts"
        rollouts.mkdir(exist_ok=True)
        trained.append(copy.deepcopy(student))
        return dict(student=trained[-1], teacher=world["teacher"], tokenizer=tokenizer,
                    train_prompts=world["train"].prompts(), pt_blocks=world["blocks"], valid_records=world["records"],
                    config=config, seed=3, rollout_dir=rollouts)

    reference, resumed = uninterrupted_and_resumed(train_minillm, lora_world, "minillm_lora", 4, fresh)
    assert comparable(resumed) == comparable(reference)
    assert all(math.isfinite(point["loss_total"]) for point in reference.train_curve)
    model = trained[-1].eval()
    assert has_adapters(model)
    after = model.state_dict()
    adapters = [name for name in after if ".lora_" in name]
    assert adapters and all(not torch.equal(after[name], torch.zeros_like(after[name])) for name in adapters
                            if ".lora_B." in name)  # B starts at zero: training moved every one
    for name, weight in after.items():
        if ".lora_" not in name:
            assert torch.equal(weight, start[name.replace(".base_layer", "")]), name

    save_checkpoint(model, tokenizer, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged").eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM" and not has_adapters(reloaded)
    assert fast_decoder(reloaded) is LlamaDecoder and fast_decoder(model) is None
    ids = torch.randint(1, len(tokenizer), (2, 12))
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    rouge_l = evaluate_rouge_l(reloaded, tokenizer, world["records"], seed=1, max_new_tokens=6, batch_size=4)
    assert 0.0 <= rouge_l <= 100.0


@pytest.mark.parametrize("teacher_precision", ["bf16", "fp16"])
def test_a_half_precision_teacher_trains_minillm_and_gkd_as_its_fp32_self_does(world, tmp_path, monkeypatch,
                                                                             teacher_precision):
    """engine.teacher_precision: the frozen teacher in bf16 or fp16 beside an fp32 student (the official scripts' fp16
    teacher). MiniLLM (teacher-mixed sampling, rewards, the single-step term) and GKD (teacher-scored divergence) run
    with finite losses, and their first step's loss stays within half-precision rounding of the fp32 teacher's."""
    monkeypatch.chdir(tmp_path)
    half = copy.deepcopy(world["teacher"]).to(engine.DTYPES[teacher_precision])
    first_losses = {}
    for name, teacher in (("fp32", world["teacher"]), (teacher_precision, half)):
        rollouts = tmp_path / f"rollouts-{name}"
        rollouts.mkdir()
        torch.manual_seed(1)
        result, _ = run_recipe(train_minillm, world, f"minillm_{name}", None, student=copy.deepcopy(world["student"]),
                               teacher=teacher, tokenizer=world["tokenizer"], train_prompts=world["train"].prompts(),
                               pt_blocks=world["blocks"], valid_records=world["records"],
                               config=MiniLLMMethod.model_validate(MINILLM | {"steps": 2}), seed=3, rollout_dir=rollouts)
        assert all(math.isfinite(point["loss_total"]) for point in result.train_curve)
        torch.manual_seed(1)
        gkd = GKDMethod(**STUDENT_DATA | {"steps": 2}, on_policy_fraction=0.5, beta=0.5, temperature=0.9,
                        loss_temperature=1.0, seq_kd=False)
        gkd_result, _ = run_recipe(train_gkd, world, f"gkd_{name}", None, student=copy.deepcopy(world["student"]),
                                   teacher=teacher, tokenizer=world["tokenizer"], train_split=world["train"],
                                   valid_split=world["valid"], valid_records=world["records"], config=gkd, seed=5)
        assert all(math.isfinite(point["loss_divergence"]) for point in gkd_result.train_curve)
        first_losses[name] = (result.train_curve[0]["loss_total"], gkd_result.train_curve[0]["loss_divergence"])
    for fp32_loss, half_loss in zip(first_losses["fp32"], first_losses[teacher_precision]):
        assert half_loss == pytest.approx(fp32_loss, rel=0.05, abs=0.05)
