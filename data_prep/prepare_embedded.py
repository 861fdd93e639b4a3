"""Prepare the embedded corpus for the default presets: tokenizer + indexed dataset, once, then cached.

    python data_prep/prepare_embedded.py                  # -> cache/embedded/
    python data_prep/prepare_embedded.py --out-dir /tmp/emb --vocab-size 4000
    python data_prep/prepare_embedded.py --task masked_lm  # -> cache/embedded_mlm/ (also the classification task)
    python data_prep/prepare_embedded.py --task image_classification   # -> cache/embedded_digits/

Writes OUT/tokenizer.{model,vocab,json} and OUT/kjv_text_document.{bin,idx,json}. The corpus's chapters are
shuffled with a fixed seed before tokenization, so that megatron's contiguous train/valid/test split draws
held-out chapters from every book rather than only the last ones (Revelation and the epistles).
OUT/stamp.json records the corpus SHA-256 and the settings; a second call with the same inputs returns at once.
--task names the task whose embedded data to prepare (DESIGN 5.8; data_prep/embedded_tasks.py): causal_lm (the
default, above), masked_lm and classification (the sentence-level corpus with its [CLS]/[SEP]/[MASK] tokenizer, and
the verse-source task), image_classification (scikit-learn's digits as an image folder).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import random
import sys
import time

from data_prep.preprocess_data import preprocess
from data_prep.train_tokenizer import train_tokenizer
from wider.files import atomic_write_json, atomic_write_jsonl, sha256_file

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus", "kjv.jsonl.xz")
FORMAT = 2  # bump when the preparation changes, so that caches are rebuilt (2: canonical tokenizer files)
SHUFFLE_SEED = 1611


def prepare_embedded(out_dir: str = "cache/embedded", vocab_size: int = 8000, workers: int = 1,
                     quiet: bool = False) -> dict:
    """Returns {"tokenizer": path to .model, "prefix": dataset prefix, "cached": bool, ...}."""
    os.makedirs(out_dir, exist_ok=True)
    tok_prefix = os.path.join(out_dir, "tokenizer")
    prefix = os.path.join(out_dir, "kjv_text_document")
    stamp_path = os.path.join(out_dir, "stamp.json")
    want = {"format": FORMAT, "corpus_sha256": sha256_file(CORPUS), "vocab_size": vocab_size, "model_type": "bpe",
            "shuffle_seed": SHUFFLE_SEED}
    result = {"tokenizer": tok_prefix + ".model", "prefix": prefix, "out_dir": os.path.abspath(out_dir)}
    files = [tok_prefix + ".model", tok_prefix + ".json", prefix + ".bin", prefix + ".idx", prefix + ".json"]
    if os.path.isfile(stamp_path) and all(os.path.isfile(f) for f in files):
        with open(stamp_path) as f:
            if json.load(f) == want:
                if not quiet:
                    print(f"embedded corpus: cached in {out_dir}")
                return {**result, "cached": True}
    t0 = time.time()
    if os.path.exists(stamp_path):
        os.remove(stamp_path)
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    shuffled = os.path.join(out_dir, "kjv_shuffled.jsonl")
    atomic_write_jsonl(shuffled, [{"text": d} for d in docs])
    train_tokenizer([shuffled], tok_prefix, vocab_size=vocab_size, quiet=quiet)
    summary = preprocess([shuffled], tok_prefix + ".model", prefix, workers=workers, quiet=quiet)
    os.remove(shuffled)
    atomic_write_json(stamp_path, want)
    if not quiet:
        print(f"embedded corpus: {summary['documents']} chapters, {summary['tokens']:,} tokens -> {out_dir} "
              f"({time.time() - t0:.1f} s)")
    return {**result, "cached": False, "tokens": summary["tokens"], "documents": summary["documents"]}


TASK_DIRS = {"causal_lm": "cache/embedded", "masked_lm": "cache/embedded_mlm", "classification": "cache/embedded_mlm",
             "image_classification": "cache/embedded_digits"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="causal_lm", choices=list(TASK_DIRS),
                   help="Whose embedded data to prepare (default causal_lm, the language models' corpus).")
    p.add_argument("--out-dir", default=None, help="Where to write (default: the task's, "
                   + ", ".join(f"{k} {v}" for k, v in TASK_DIRS.items() if k != "classification") + ").")
    p.add_argument("--vocab-size", type=int, default=8000, help="Tokenizer vocabulary (default 8000).")
    p.add_argument("--workers", type=int, default=1, help="Tokenizer processes (the corpus is small: 1).")
    a = p.parse_args(argv)
    out = a.out_dir or TASK_DIRS[a.task]
    if a.task == "causal_lm":
        prepare_embedded(out, a.vocab_size, a.workers)
    elif a.task == "image_classification":
        from data_prep.embedded_tasks import prepare_digits

        prepare_digits(out)
    else:
        from data_prep.embedded_tasks import prepare_mlm

        prepare_mlm(out, a.vocab_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
