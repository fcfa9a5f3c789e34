"""DVC stage `build_data`: instruction splits, evaluation sets, tokenizer, tokenized arrays, PT blocks.

Writes one directory, data/, atomically:
  instructions/{train,valid}.jsonl   eval/<set>.jsonl   tokenizer/   tokenized/{train,valid}.npz
  pretrain/blocks.npy   stats.json
"""

import numpy as np

from pipeline import data, synthetic
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_directory, atomic_write_json, atomic_write_jsonl, write_checksums
from pipeline.models import load_tokenizer
from pipeline.tracking import StageRun


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
    if config.source == "jsonl":
        numbered = data.read_jsonl_numbered(config.jsonl_path)
        raw, line_numbers = [record for _, record in numbered], [line for line, _ in numbered]
        records, dropped_empty = data.validate_dolly_records(raw, config.jsonl_path, line_numbers)
    else:
        records, dropped_empty = data.validate_dolly_records(data.load_dolly_from_hub(), "databricks/databricks-dolly-15k")
    train, valid, test = data.split_records(records, config.valid_size, config.test_size, params.seed)
    eval_sets = {"dollyeval": test}
    for name, source in config.eval_sets.items():
        if source == "hub":
            eval_sets[name], dropped = data.load_eval_set_from_hub(name)
        else:
            eval_sets[name], dropped = data.eval_set_records(data.read_jsonl(source), name, source)
        print(f"build_data: {name}: {len(eval_sets[name])} records from {source} ({dropped} dropped: no gold response "
              "of the required length)")
    return train, valid, eval_sets, dropped_empty


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


def main() -> None:
    params = load_params()
    config = params.data
    with StageRun("build_data", declaration("build_data").params) as run:
        train, valid, eval_sets, dropped_empty = load_instruction_splits(params)
        documents = pretrain_documents(params)
        tokenizer = shared_tokenizer(params, train, documents)

        stats = {"dropped_empty_response": dropped_empty, "vocab_size": len(tokenizer), "vocab_hash": data.vocabulary_hash(tokenizer)}
        with atomic_directory("data") as out:
            tokenizer.save_pretrained(out / "tokenizer")
            write_checksums(out / "tokenizer")
            (out / "tokenized").mkdir()
            for name, records in (("train", train), ("valid", valid)):
                split, kept, dropped = data.tokenize_records(tokenizer, records, config.max_length, config.max_prompt_length)
                if len(split) == 0:
                    raise ConfigError(f"{name} split: every prompt is over data.max_prompt_length ({config.max_prompt_length})")
                split.save(out / "tokenized" / f"{name}.npz")
                atomic_write_jsonl(out / "instructions" / f"{name}.jsonl", kept)
                stats[f"{name}_examples"], stats[f"{name}_dropped_long_prompt"] = len(split), dropped
                stats[f"{name}_tokens"] = int(len(split.tokens))
            for name, records in eval_sets.items():
                _, kept, dropped = data.tokenize_records(tokenizer, records, config.max_length, config.max_prompt_length)
                if not kept:
                    raise ConfigError(f"evaluation set '{name}' is empty after the max_prompt_length filter")
                atomic_write_jsonl(out / "eval" / f"{name}.jsonl", kept)
                stats[f"eval_{name}_examples"], stats[f"eval_{name}_dropped_long_prompt"] = len(kept), dropped
            blocks = data.pack_pretrain_blocks(tokenizer, documents, config.pretrain.block_size)
            (out / "pretrain").mkdir()
            np.save(out / "pretrain" / "blocks.npy", blocks)
            stats["pretrain_blocks"] = int(blocks.shape[0])
            atomic_write_json(out / "stats.json", stats)
        run.log_metrics({k: float(v) for k, v in stats.items() if isinstance(v, int)})
        print(f"build_data: {stats['train_examples']} train / {stats['valid_examples']} valid examples, "
              f"{len(eval_sets)} evaluation sets, {stats['pretrain_blocks']} PT blocks, vocabulary {stats['vocab_size']}")


if __name__ == "__main__":
    exit_on_user_error(main)
