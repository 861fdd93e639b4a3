"""The embedded data of the encoder tasks (DESIGN 5.8), built from what the repository and its pinned packages hold, so
every task runs offline:

- masked_lm (cache/embedded_mlm/): the embedded King James corpus (data_prep/corpus) with a tokenizer that has the
  [CLS] / [SEP] / [MASK] pieces (8000-piece BPE over the same shuffled chapters as the language model's) and a
  sentence-level indexed dataset, kjv_sentence_document: one chapter per document (the layout megatron-core's BERT
  dataset reads for its sentence pairs), no end-of-document ids, and the verses' clauses as its sentences (a verse
  split after each , ; : . ? or ! that a space follows). Why clauses, not verses: consecutive verses of a chapter
  give a small model almost nothing to order them by (a logistic probe on the tokens at the segment boundaries,
  20,000 pairs: 0.53), while a clause's punctuation and the next clause's first word do (the same probe: 0.61), so
  the CPU smoke run's sentence-order head has something to learn in minutes.
- classification (cache/embedded_mlm/verse_source/): from which of four parts of the Bible a verse comes:
  law_and_history (Genesis-Esther), poetry_and_prophets (Job-Malachi), gospels_and_acts (Matthew-Acts),
  letters_and_revelation (Romans-Revelation). Whole chapters are held out (a fifth of each part's chapters, drawn
  with a fixed seed), so no dev verse has its neighbours in training; each part contributes the same number of
  examples (the majority class scores 0.25), up to 1500 training and 300 dev verses. GLUE's single-sentence TSV
  layout: train.tsv and dev.tsv with the header `sentence<TAB>label`.
- image_classification (cache/embedded_digits/): scikit-learn's bundled handwritten digits (1,797 8 x 8 greyscale
  images of 0-9, the UCI optical-recognition test set; BSD-licensed, read from the installed package, no download)
  written as PNG files in ImageNet's layout, train/<digit>/NNNN.png and val/<digit>/NNNN.png, a fifth of each
  digit held out with a fixed seed.

Each output directory has a stamp.json of its inputs and settings; a second call with the same ones returns at once.
"""

from __future__ import annotations

import json
import lzma
import os
import random
import re
import shutil
import time

from data_prep.preprocess_data import preprocess
from data_prep.train_tokenizer import train_tokenizer
from wider.files import atomic_write_json, atomic_write_jsonl, atomic_write_text, sha256_file

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus", "kjv.jsonl.xz")
MLM_FORMAT, DIGITS_FORMAT = 2, 1  # bump when the preparation changes, so that caches are rebuilt
SHUFFLE_SEED = 1611  # data_prep/prepare_embedded.py's: the same chapter order as the language model's corpus
SPLIT_SEED = 16
SPECIAL = "[CLS],[SEP],[MASK]"
PARTS = (("law_and_history", "Genesis"), ("poetry_and_prophets", "Job"), ("gospels_and_acts", "Matthew"),
         ("letters_and_revelation", "Romans"))  # each part starts at this book, in the corpus's (canonical) order
TRAIN_PER_PART, DEV_PER_PART = 1500, 300
CLAUSE_END = re.compile(r"(?<=[,;:.?!])\s+")  # a clause ends at punctuation that a space follows


def _cached(out_dir: str, want: dict, files: list) -> bool:
    stamp = os.path.join(out_dir, "stamp.json")
    if not (os.path.isfile(stamp) and all(os.path.exists(os.path.join(out_dir, f)) for f in files)):
        return False
    with open(stamp) as f:
        return json.load(f) == want


def _chapters() -> list:
    with lzma.open(CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prepare_mlm(out_dir: str = "cache/embedded_mlm", vocab_size: int = 8000, quiet: bool = False) -> dict:
    """The masked-LM corpus and the verse-source task (module docstring). Returns their paths and whether cached."""
    os.makedirs(out_dir, exist_ok=True)
    tok, prefix = os.path.join(out_dir, "tokenizer"), os.path.join(out_dir, "kjv_sentence_document")
    task_dir = os.path.join(out_dir, "verse_source")
    result = {"tokenizer": tok + ".model", "prefix": prefix, "train": os.path.join(task_dir, "train.tsv"),
              "dev": os.path.join(task_dir, "dev.tsv"), "out_dir": os.path.abspath(out_dir)}
    want = {"format": MLM_FORMAT, "corpus_sha256": sha256_file(CORPUS), "vocab_size": vocab_size,
            "special": SPECIAL, "shuffle_seed": SHUFFLE_SEED, "split_seed": SPLIT_SEED,
            "per_part": [TRAIN_PER_PART, DEV_PER_PART]}
    files = ["tokenizer.model", "tokenizer.json", "kjv_sentence_document.bin", "kjv_sentence_document.idx",
             "kjv_sentence_document.json", "verse_source/train.tsv", "verse_source/dev.tsv"]
    if _cached(out_dir, want, files):
        if not quiet:
            print(f"embedded masked-LM corpus and verse task: cached in {out_dir}")
        return {**result, "cached": True}
    t0 = time.time()
    stamp = os.path.join(out_dir, "stamp.json")
    if os.path.exists(stamp):
        os.remove(stamp)
    chapters = _chapters()
    docs = [clauses(c["text"]) for c in chapters]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    shuffled = os.path.join(out_dir, "kjv_shuffled.jsonl")
    atomic_write_jsonl(shuffled, [{"text": d} for d in docs])
    try:
        train_tokenizer([shuffled], tok, vocab_size=vocab_size, user_defined_symbols=SPECIAL.split(","), quiet=quiet)
        summary = preprocess([shuffled], tok + ".model", prefix, append_eod=False, sentences="lines", quiet=quiet)
    finally:
        os.remove(shuffled)
    train, dev = verse_source(chapters)
    os.makedirs(task_dir, exist_ok=True)
    for path, rows in ((result["train"], train), (result["dev"], dev)):
        atomic_write_text(path, "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows))
    atomic_write_json(stamp, want)
    if not quiet:
        print(f"embedded masked-LM corpus: {summary['documents']} chapters, {summary['sentences']:,} clauses, "
              f"{summary['tokens']:,} tokens; verse task: {len(train)} train / {len(dev)} dev verses -> {out_dir} "
              f"({time.time() - t0:.1f} s)")
    return {**result, "cached": False, "tokens": summary["tokens"], "sentences": summary["sentences"]}


def clauses(chapter: str) -> str:
    """A chapter's text (one verse per line) as one clause per line: the sentences of the masked-LM dataset."""
    return "\n".join(c for verse in chapter.split("\n") for c in CLAUSE_END.split(verse.strip()) if c)


def verse_source(chapters: list) -> tuple[list, list]:
    """(train, dev) lists of (verse, part) from the chapters in canonical order (module docstring)."""
    starts = {book: label for label, book in PARTS}
    rng = random.Random(SPLIT_SEED)
    by_part: dict = {label: ([], []) for label, _ in PARTS}
    label = None
    for chapter in chapters:
        book = chapter["title"].rsplit(" ", 1)[0]
        label = starts.get(book, label)
        held_out = rng.random() < 0.2
        verses = [v.strip().replace("\t", " ") for v in chapter["text"].split("\n") if v.strip()]
        by_part[label][1 if held_out else 0].extend(verses)
    train, dev = [], []
    for label, (tr, dv) in by_part.items():
        train += [(v, label) for v in rng.sample(tr, min(TRAIN_PER_PART, len(tr)))]
        dev += [(v, label) for v in rng.sample(dv, min(DEV_PER_PART, len(dv)))]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


def prepare_digits(out_dir: str = "cache/embedded_digits", quiet: bool = False) -> dict:
    """scikit-learn's digits as an image folder with a held-out split (module docstring)."""
    import numpy as np
    import sklearn
    from PIL import Image
    from sklearn.datasets import load_digits

    result = {"train": os.path.join(out_dir, "train"), "val": os.path.join(out_dir, "val"),
              "out_dir": os.path.abspath(out_dir)}
    want = {"format": DIGITS_FORMAT, "source": f"scikit-learn {sklearn.__version__} load_digits",
            "split_seed": SPLIT_SEED}
    os.makedirs(out_dir, exist_ok=True)
    if _cached(out_dir, want, [f"{split}/{digit}" for split in ("train", "val") for digit in range(10)]):
        if not quiet:
            print(f"embedded digits: cached in {out_dir}")
        return {**result, "cached": True}
    stamp = os.path.join(out_dir, "stamp.json")
    if os.path.exists(stamp):
        os.remove(stamp)
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # the data's 0-16 levels as 8-bit grey
    rng = np.random.default_rng(SPLIT_SEED)
    tmp = os.path.join(out_dir, f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    try:
        for digit in range(10):
            idx = np.flatnonzero(digits.target == digit)
            held = set(rng.choice(idx, size=len(idx) // 5, replace=False).tolist())
            for i in idx:
                split = "val" if i in held else "train"
                folder = os.path.join(tmp, split, str(digit))
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(pixels[i], mode="L").save(os.path.join(folder, f"{i:04d}.png"))
                counts[split] += 1
        for split in ("train", "val"):  # replace only what an earlier preparation wrote
            shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
            os.replace(os.path.join(tmp, split), os.path.join(out_dir, split))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(stamp, want)
    if not quiet:
        print(f"embedded digits: {counts['train']} train / {counts['val']} held-out 8 x 8 images -> {out_dir}")
    return {**result, "cached": False, **counts}
