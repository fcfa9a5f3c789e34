"""ZeRO-3 on 2 gloo ranks (tests/zero3_worker.py): with every parameter partitioned, the student's and the frozen
teacher's (ZeRO-3 inference), SFT, KD and MiniLLM reach the parameters that ZeRO-0 reaches on the same global batch;
a run killed after a checkpoint resumes to the uninterrupted run's parameters; and the student gathered on rank 0
is saved as a Hugging Face directory that `from_pretrained` reloads."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import data, synthetic
from tests.test_engine import REPO_ROOT, child_environment, max_difference
from tests.zero3_worker import FAMILIES

# Float tolerance: the partitioned path sums gradients in another order (reduce-scatter of flat buffers).
PARAMETER_ATOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    world_dir, out = tmp_path_factory.mktemp("zero3_world"), tmp_path_factory.mktemp("zero3_out")
    suite = synthetic.build_suite(7, 24, 6, 1)
    texts = [data.build_prompt(r["instruction"], r["context"]) + r["response"] for r in suite["train"]]
    tokenizer = data.train_bpe_tokenizer(texts, 300)
    train_split, _, _ = data.tokenize_records(tokenizer, suite["train"], 160, 128)
    valid_split, valid_records, _ = data.tokenize_records(tokenizer, suite["valid"], 160, 128)
    blocks = torch.from_numpy(data.pack_pretrain_blocks(tokenizer, texts, 32).astype("int64"))
    torch.save({"tokenizer": tokenizer, "train": train_split, "valid": valid_split, "records": valid_records[:4],
                "blocks": blocks}, world_dir / "world.pt")
    env = child_environment() | {"PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO_ROOT / "tests" / "zero3_worker.py"), "--world", str(world_dir), "--out", str(out)]
    completed = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-6000:]
    return torch.load(out / "results.pt", weights_only=False), out


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["sft", "kd", "gkd", "minillm", "opd"])
def test_zero3_reaches_the_parameters_of_zero0(results, family, method):
    runs, _ = results
    zero0, zero3 = runs[(family, method, 0)], runs[(family, method, 3)]
    assert zero3["final"].keys() == zero0["final"].keys() and len(zero0["final"]) > 4
    assert max_difference(zero3["final"], zero0["final"]) < PARAMETER_ATOL
    assert max_difference(zero3["best"], zero0["best"]) < PARAMETER_ATOL
    # Validation (loss and sampled Rouge-L under ZeRO-3's lock-step generation) sees the same models.
    assert [p["step"] for p in zero3["valid_curve"]] == [p["step"] for p in zero0["valid_curve"]]
    for at3, at0 in zip(zero3["valid_curve"], zero0["valid_curve"]):
        assert at3["valid_rouge_l"] == pytest.approx(at0["valid_rouge_l"], abs=1e-9)
    # The runs trained: a comparison of two untouched models would pass trivially.
    assert max_difference(zero0["final"], runs[(family, "initial")]) > 100 * PARAMETER_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_zero3_partitions_the_student_and_the_frozen_teacher_across_the_ranks(results, family):
    """Each rank holds half of each model (DeepSpeed pads a partition to an even split: at most a few elements
    more), and the teacher's LM head is the one whole copy (engine.partition_teacher)."""
    runs, _ = results
    student_share, student_total = runs[(family, "held")]["student"]
    teacher_share, teacher_total = runs[(family, "held")]["teacher"]
    assert student_share == pytest.approx(0.5, abs=0.01) and student_total == pytest.approx(1.0, abs=0.02)
    assert 0.5 < teacher_share < 0.6 and teacher_total > 1.0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_zero3_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_parameters(results, family):
    runs, _ = results
    assert max_difference(runs[(family, "sft-resumed", 3)]["final"], runs[(family, "sft", 3)]["final"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_zero3_student_saved_on_rank_0_reloads_with_from_pretrained(results, family):
    runs, out = results
    reloaded = AutoModelForCausalLM.from_pretrained(out / f"{family}-minillm")
    assert reloaded.config.model_type == family
    state = reloaded.state_dict()
    best = runs[(family, "minillm", 3)]["best"]
    assert all(torch.equal(state[name], value) for name, value in best.items())
