"""DVC stage `build_data`: instruction splits, evaluation sets, tokenizer, tokenized arrays, PT blocks.

Writes one directory (--out: data/), atomically:
  instructions/{train,valid}.jsonl   eval/<set>.jsonl   tokenizer/   tokenized/{train,valid}.npz
  pretrain/blocks.npy   stats.json
"""

import argparse

import numpy as np

from pipeline import data
from pipeline.config import ConfigError, exit_on_user_error, load_params
from pipeline.dvc_stages import declaration
from pipeline.io import atomic_directory, atomic_write_json, atomic_write_jsonl, write_checksums
from pipeline.sources import load_instruction_splits, pretrain_documents, shared_tokenizer
from pipeline.tracking import StageRun


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="the data directory to write")
    arguments = parser.parse_args()
    params = load_params()
    config = params.data
    with StageRun("build_data", declaration("build_data").params) as run:
        train, valid, eval_sets, dropped_empty = load_instruction_splits(params)
        documents = pretrain_documents(params)
        tokenizer = shared_tokenizer(params, train, documents)

        stats = {"dropped_empty_response": dropped_empty, "vocab_size": len(tokenizer), "vocab_hash": data.vocabulary_hash(tokenizer)}
        with atomic_directory(arguments.out) as out:
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
                if config.long_eval_prompts == "truncate":  # evaluation cuts them (data.long_eval_prompts)
                    kept, stats[f"eval_{name}_truncated_long_prompt"], dropped = records, dropped, 0
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
