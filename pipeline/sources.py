"""Where build_data's inputs come from: the instruction splits and evaluation sets (synthetic, a JSONL file or
Dolly from the Hub), the pre-training documents, and the tokenizer shared by every model."""

from pipeline import data, synthetic
from pipeline.models import load_tokenizer


def load_instruction_splits(params):
    """-> train, valid, {eval set: records}. Synthetic gives all five slots; Dolly/JSONL give DollyEval plus the
    sets listed in data.eval_sets."""
    config = params.data
    if config.source == "synthetic":
        suite = synthetic.build_suite(
            params.seed, config.synthetic.n_train, config.synthetic.n_valid, config.synthetic.n_per_eval_set
        )
        eval_sets = {name: suite[name] for name in synthetic.EVAL_SETS}
        return suite["train"], suite["valid"], eval_sets, 0
    if config.source == "jsonl" and config.splits is not None:
        # As given, no shuffle: valid_size and test_size do not apply.
        splits, dropped_empty = {}, 0
        for name, path in (("train", config.splits.train), ("valid", config.splits.valid), ("dollyeval", config.splits.test)):
            splits[name], dropped = data.eval_set_records(data.read_jsonl(path), name, path)
            dropped_empty += dropped
        eval_sets = {"dollyeval": splits["dollyeval"]} | extra_eval_sets(config)
        return splits["train"], splits["valid"], eval_sets, dropped_empty
    if config.source == "jsonl":
        numbered = data.read_jsonl_numbered(config.jsonl_path)
        raw, line_numbers = [record for _, record in numbered], [line for line, _ in numbered]
        records, dropped_empty = data.validate_dolly_records(raw, config.jsonl_path, line_numbers)
    else:
        records, dropped_empty = data.validate_dolly_records(data.load_dolly_from_hub(), "databricks/databricks-dolly-15k")
    train, valid, test = data.split_records(records, config.valid_size, config.test_size, params.seed)
    return train, valid, {"dollyeval": test} | extra_eval_sets(config), dropped_empty


def extra_eval_sets(config) -> dict[str, list[dict]]:
    """The paper's other evaluation sets listed in data.eval_sets."""
    eval_sets = {}
    for name, source in config.eval_sets.items():
        if source == "hub":
            eval_sets[name], dropped = data.load_eval_set_from_hub(name)
        else:
            eval_sets[name], dropped = data.eval_set_records(data.read_jsonl(source), name, source)
        print(f"build_data: {name}: {len(eval_sets[name])} records from {source} ({dropped} dropped: no gold response "
              "of the required length)")
    return eval_sets


def pretrain_documents(params) -> list[str]:
    corpus = params.data.pretrain
    if corpus.source == "synthetic":
        return synthetic.build_pretrain_corpus(params.seed, corpus.n_documents)
    return data.read_pretrain_documents(corpus.source, corpus.path, corpus.n_documents)


def shared_tokenizer(params, train: list[dict], documents: list[str]):
    """The pretrained teacher's tokenizer, else a byte-level BPE trained on our data. Each pretrained student
    is checked against it, by vocabulary, in its pretrain_student stage."""
    if params.models.teacher.name_or_path:
        return load_tokenizer(params.models.teacher.name_or_path)
    texts = [data.build_prompt(r["instruction"], r["context"]) + r["response"] for r in train] + documents
    return data.train_bpe_tokenizer(texts, params.data.tokenizer_vocab_size)
