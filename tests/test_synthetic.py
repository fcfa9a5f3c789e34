import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import synthetic
from pipeline.synthetic import EVAL_SETS, build_pretrain_corpus, build_suite

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITE_ARGS = {"seed": 7, "n_train": 1500, "n_valid": 150, "n_per_eval_set": 120}
CORPUS_ARGS = {"seed": 7, "n_documents": 600}


@pytest.fixture(scope="module")
def suite() -> dict[str, list[dict]]:
    return build_suite(**SUITE_ARGS)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return build_pretrain_corpus(**CORPUS_ARGS)


def dump(data: object) -> str:
    return json.dumps(data, sort_keys=True)


def of_category(records: list[dict], category: str) -> list[dict]:
    selected = [r for r in records if r["category"] == category]
    assert selected, f"no {category} records to check"
    return selected


def all_records(suite: dict[str, list[dict]]) -> list[dict]:
    return [record for records in suite.values() for record in records]


def test_same_arguments_give_identical_output_and_another_seed_differs(suite, corpus):
    assert dump(build_suite(**SUITE_ARGS)) == dump(suite)
    assert dump(build_suite(**{**SUITE_ARGS, "seed": 8})) != dump(suite)
    assert dump(build_pretrain_corpus(**CORPUS_ARGS)) == dump(corpus)
    assert dump(build_pretrain_corpus(**{**CORPUS_ARGS, "seed": 8})) != dump(corpus)


def test_output_is_identical_in_a_fresh_interpreter_with_other_string_hashing(suite, corpus):
    # A different PYTHONHASHSEED changes set and str-hash order: any reliance on them would show here.
    script = (
        "import json; from pipeline.synthetic import build_suite, build_pretrain_corpus; "
        f"print(json.dumps([build_suite(**{SUITE_ARGS!r}), build_pretrain_corpus(**{CORPUS_ARGS!r})], sort_keys=True))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == dump([suite, corpus])


def test_records_follow_the_schema(suite):
    for name, records in suite.items():
        for record in records:
            assert set(record) == {"instruction", "context", "response", "category", "references"}, name
            assert all(isinstance(record[key], str) for key in ("instruction", "context", "response", "category"))
            assert isinstance(record["references"], list)
            assert all(isinstance(reference, str) and reference.strip() for reference in record["references"])
            assert record["instruction"].strip() and record["response"].strip()
            assert record["response"] in record["references"]
            assert len(set(record["references"])) == len(record["references"]) <= 12


def test_sets_have_the_requested_sizes(suite):
    assert set(suite) == {"train", "valid", *EVAL_SETS}
    assert len(suite["train"]) == 1500
    assert len(suite["valid"]) == 150
    assert all(len(suite[name]) == 120 for name in EVAL_SETS)
    small = build_suite(seed=1, n_train=5, n_valid=0, n_per_eval_set=3)
    assert [len(small[name]) for name in ("train", "valid", *EVAL_SETS)] == [5, 0, 3, 3, 3, 3, 3]


def test_evaluation_sets_do_not_depend_on_the_train_or_valid_size(suite):
    other = build_suite(**{**SUITE_ARGS, "n_train": 40, "n_valid": 7})
    assert all(dump(other[name]) == dump(suite[name]) for name in EVAL_SETS)


def test_negative_sizes_are_rejected():
    with pytest.raises(ValueError, match="valid"):
        build_suite(seed=0, n_train=1, n_valid=-1, n_per_eval_set=1)
    with pytest.raises(ValueError, match="n_documents"):
        build_pretrain_corpus(seed=0, n_documents=-1)


def test_a_set_whose_families_run_out_of_prompts_raises_naming_it():
    def the_same_prompt_every_time(rng: random.Random, style: object) -> dict:
        return {"instruction": "Say hi.", "context": "", "response": "hi", "category": "greeting", "references": ["hi"]}

    taken: set[tuple[str, str]] = set()
    args = (random.Random(0), "probe_set", 2, (the_same_prompt_every_time,), synthetic._IN_DISTRIBUTION, taken, set())
    with pytest.raises(ValueError, match="probe_set"):
        synthetic._draw(*args)


def test_train_mixes_many_families_with_and_without_context_and_with_several_answers(suite):
    train = suite["train"]
    assert len({r["category"] for r in train}) >= 8
    assert any(r["context"] for r in train) and any(not r["context"] for r in train)
    multi_answer_categories = {r["category"] for r in train if len(r["references"]) > 1}
    assert len(multi_answer_categories) >= 3
    # Every category is asked both by train and by the in-distribution and held-out-phrasing eval sets.
    assert {r["category"] for r in suite["dollyeval"]} == {r["category"] for r in train}
    assert {r["category"] for r in suite["selfinst"]} == {r["category"] for r in train}


def test_sft_responses_are_spread_over_the_valid_answers(suite):
    # The response is drawn uniformly from the references; were it always the first one,
    # SFT would teach a single mode and forward and reverse KL would have nothing to disagree on.
    multi = [r for r in suite["train"] if len(r["references"]) > 1]
    expected_first = sum(1 / len(r["references"]) for r in multi)
    observed_first = sum(r["response"] == r["references"][0] for r in multi)
    assert abs(observed_first - expected_first) < 4 * math.sqrt(expected_first)


def test_prompts_never_repeat_within_or_across_sets(suite):
    seen: dict[tuple[str, str], str] = {}
    for name, records in suite.items():
        for record in records:
            prompt = (record["instruction"], record["context"])
            assert prompt not in seen, f"{prompt} is in both {seen[prompt]} and {name}"
            seen[prompt] = name


def test_arithmetic_answers_are_right(suite):
    for record in of_category(all_records(suite), "arithmetic"):
        instruction = record["instruction"].lower()
        numbers = [int(n) for n in re.findall(r"\d+", instruction)]
        if any(word in instruction for word in ("plus", "add", "sum")):
            expected = sum(numbers)
        elif any(word in instruction for word in ("times", "multiply", "product")):
            expected = numbers[0] * numbers[1]
        elif "minus" in instruction:
            expected = numbers[0] - numbers[1]
        else:  # "subtract B from A", "take B away from A"
            assert "from" in instruction, instruction
            expected = numbers[1] - numbers[0]
        assert record["references"] == [str(expected)], record


def test_sorting_answers_are_the_sorted_words(suite):
    for record in of_category(all_records(suite), "sorting"):
        words = record["instruction"].split(": ", 1)[1].rstrip(".").split(", ")
        assert len(set(words)) == len(words) >= 3
        assert record["references"] == [", ".join(sorted(words))]


def test_counting_answers_match_a_direct_count(suite):
    for record in of_category(all_records(suite), "counting"):
        words = record["context"].split(", ")
        asked = re.search(r"does (\w+) appear|often (\w+) appears|often is (\w+) in|the word (\w+)\?", record["instruction"])
        if asked:
            (word,) = [group for group in asked.groups() if group]
            expected = words.count(word)
        else:
            expected = len(words)
        assert record["references"] == [str(expected)], record


def test_closed_qa_answers_occur_in_the_passage(suite):
    for record in of_category(all_records(suite), "closed_qa"):
        (answer,) = record["references"]
        assert re.search(rf"\b{re.escape(answer)}\b", record["context"]), record
        # The answer sits in a sentence about the person the question names.
        asked_person = next(n for n in re.findall(r"[A-Z][a-z]+", record["instruction"])
                            if re.search(rf"\b{n}\b", record["context"]))
        sentences = record["context"].split(". ")
        assert any(asked_person in s and re.search(rf"\b{answer}\b", s) for s in sentences), record


def test_extraction_answers_pair_each_person_with_a_fact_from_the_passage(suite):
    for record in of_category(all_records(suite), "extraction"):
        (answer,) = record["references"]
        clauses = re.split(r", | and ", answer.rstrip("."))
        sentences = record["context"].split(". ")
        passage_people = list(dict.fromkeys(re.findall(r"(?!The\b)[A-Z][a-z]+", s)[0] for s in sentences))
        assert [clause.split()[0] for clause in clauses] == passage_people, record
        for clause in clauses:
            person, value = clause.split()[0], clause.split()[-1]
            assert any(person in s and re.search(rf"\b{value}\b", s) for s in sentences), (clause, record)


def test_summaries_state_only_facts_from_the_passage(suite):
    for record in of_category(all_records(suite), "summarization"):
        passage_tokens = set(re.findall(r"\w+", record["context"]))
        for reference in record["references"]:
            names_and_numbers = re.findall(r"\b(?:[A-Z][a-z]+|\d+)\b", reference)
            assert set(names_and_numbers) <= passage_tokens, (reference, record["context"])


def capitals_stated_in(texts: list[str]) -> dict[str, set[str]]:
    capitals: dict[str, set[str]] = {}
    for text in texts:
        for country, town in re.findall(r"The capital of (\w+) is (\w+)\.", text):
            capitals.setdefault(country, set()).add(town)
        for town, country in re.findall(r"(\w+) is the capital of (\w+)\.", text):
            capitals.setdefault(country, set()).add(town)
    return capitals


def test_world_facts_agree_across_records_seeds_and_the_corpus(suite, corpus):
    other_seed = build_suite(seed=99, n_train=500, n_valid=0, n_per_eval_set=50)
    answers = [ref for records in (all_records(suite), all_records(other_seed)) for r in records for ref in r["references"]]
    capitals = capitals_stated_in(answers)
    assert len(capitals) >= 5
    assert all(len(towns) == 1 for towns in capitals.values()), capitals
    corpus_capitals = capitals_stated_in(corpus)
    assert all(corpus_capitals[country] == towns for country, towns in capitals.items())


def test_corpus_is_prose_that_states_what_the_questions_ask(suite, corpus):
    assert len(corpus) == CORPUS_ARGS["n_documents"]
    assert all(2 <= document.count(".") <= 8 for document in corpus)
    corpus_text = " ".join(corpus)
    for name in ("train", "unni"):
        for record in of_category(suite[name], "open_qa"):
            assert any(reference in corpus_text for reference in record["references"]), (name, record)


def test_named_members_have_the_asked_property_in_the_corpus(suite, corpus):
    corpus_text = " ".join(corpus)
    checked = 0
    for record in all_records(suite):
        pet = re.search(r"(?:person|people) who (?:has|have) a (\w+)", record["instruction"])
        if record["category"] not in ("name_one", "list_three") or not pet:
            continue
        for name in set(re.findall(r"[A-Z][a-z]+", " ".join(record["references"]))):
            assert f"{name} has a {pet.group(1)}." in corpus_text or f"The pet of {name} is a {pet.group(1)}." in corpus_text
            checked += 1
    assert checked > 0


def test_list_three_answers_are_three_distinct_valid_members(suite):
    flying_animals = {"owl", "duck", "parrot", "bat", "eagle"}  # real-world knowledge
    for record in of_category(suite["train"], "list_three"):
        for reference in record["references"]:
            members = re.split(r", | and ", reference)
            assert len(set(members)) == len(members) == 3
            if "animals that can fly" in record["instruction"]:
                assert set(members) <= flying_animals
    fliers = [r for r in suite["train"] + suite["valid"] if r["instruction"].endswith("animals that can fly.")]
    assert all(len(r["references"]) == math.comb(5, 3) for r in fliers)


def masked_skeleton(instruction: str) -> str:
    """The instruction's template: names (capitalised words past a sentence start), numbers and word lists masked."""
    instruction = instruction.split(":")[0]
    tokens = instruction.split()
    masked = []
    for index, token in enumerate(tokens):
        starts_sentence = index == 0 or tokens[index - 1][-1] in ".?!"
        if re.fullmatch(r"\d+\W*", token):
            masked.append("N")
        elif token[0].isupper() and not starts_sentence:
            masked.append("X")
        else:
            masked.append(token)
    return " ".join(masked)


def test_selfinst_uses_phrasings_train_never_uses(suite):
    train_skeletons = {masked_skeleton(r["instruction"]) for r in suite["train"]}
    selfinst_skeletons = {masked_skeleton(r["instruction"]) for r in suite["selfinst"]}
    assert not train_skeletons & selfinst_skeletons
    # Control: dollyeval shares train's phrasings, so the same check must see the overlap there.
    assert {masked_skeleton(r["instruction"]) for r in suite["dollyeval"]} & train_skeletons


def words_per_record(records: list[dict]) -> float:
    return sum(len((r["instruction"] + " " + r["context"] + " " + r["response"]).split()) for r in records) / len(records)


def test_vicunaeval_is_longer_than_dollyeval(suite):
    assert words_per_record(suite["vicunaeval"]) > 1.3 * words_per_record(suite["dollyeval"])


def test_short_texts_for_tiny_models(suite):
    for name in ("train", "valid", "dollyeval", "selfinst", "sni", "unni"):
        for record in suite[name]:
            assert len(record["instruction"].split()) <= 20
            assert len(record["context"].split()) <= 50
            assert 1 <= len(record["response"].split()) <= 20


def test_sni_keeps_long_answers_on_passages_train_and_valid_never_see(suite):
    sni = suite["sni"]
    assert all(r["context"] and len(r["response"].split()) >= 8 for r in sni)
    seen_passages = {r["context"] for r in suite["train"] + suite["valid"]}
    assert not seen_passages & {r["context"] for r in sni}


def test_unni_asks_about_entities_absent_from_every_other_set(suite):
    other_names = set()
    for name, records in suite.items():
        if name != "unni":
            for record in records:
                other_names |= set(re.findall(r"\b[A-Z][a-z]+\b", " ".join([record["instruction"], record["context"],
                                                                           *record["references"]])))
    for record in suite["unni"]:
        assert len(record["response"].split()) >= 5
        names = set(re.findall(r"\b[A-Z][a-z]+\b", record["instruction"] + " " + record["context"]))
        assert names - other_names, record
