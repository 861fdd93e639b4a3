"""Train a SentencePiece tokenizer (BPE or unigram) from text, JSONL or parquet.

    python data_prep/train_tokenizer.py --input corpus/*.jsonl.gz --json-key text --vocab-size 32000 \
        --output-prefix data/tok
    python data_prep/train_tokenizer.py --input books/ --text-mode paragraph --model-type unigram \
        --vocab-size 8000 --user-defined-symbols "<sep>,<cls>" --output-prefix data/tok8k

Writes PREFIX.model, PREFIX.vocab and PREFIX.json (ids of unk / bos / eos = end of document / pad, the
vocabulary size, the settings, the sources and the model's SHA-256). Ids: unk 0, bos 1, eos 2 (EOD), pad 3.
The files are written atomically: PREFIX.json is written last, so its presence means the tokenizer is complete.
Training is deterministic for a given input, settings and --seed (SentencePiece runs single-threaded here by
default for that reason; --num-threads trades that for speed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import Iterator, Optional

from data_prep.documents import DataPrepError, TEXT_MODES, expand_inputs, iter_documents
from wider.files import atomic_write_json, sha256_file

UNK, BOS, EOS, PAD = 0, 1, 2, 3


def _model_proto(data: bytes):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    return proto


def canonical_model_bytes(data: bytes) -> bytes:
    """A SentencePiece model without where it was trained: SentencePiece stores the training output path
    (trainer_spec.model_prefix, an absolute temporary path here) and the input files in the model, so the same
    corpus trained in two checkouts would give two files. Those fields change nothing in how text is encoded."""
    proto = _model_proto(data)
    proto.trainer_spec.model_prefix = ""
    del proto.trainer_spec.input[:]
    return proto.SerializeToString(deterministic=True)


def tokenizer_identity(path: str) -> str:
    """A tokenizer's identity is its content: pieces, scores and types, the normaliser and every encoding setting,
    not the file's bytes (SHA-256 of canonical_model_bytes). Checkpoints and datasets record it, so a run directory
    or dataset made in one checkout is recognised in another."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(canonical_model_bytes(f.read())).hexdigest()


def _sentences(docs: Iterator[str], max_len: int, progress) -> Iterator[str]:
    """Documents split into lines, and lines longer than SentencePiece's max_sentence_length into pieces
    (at spaces where possible), so that nothing is silently skipped."""
    for doc in docs:
        progress.update(1)
        for line in doc.split("\n"):
            line = line.strip()
            while len(line.encode("utf-8")) > max_len:
                cut = line.rfind(" ", 0, max_len // 4) if " " in line[: max_len // 4] else max_len // 4
                cut = max(cut, 1)
                yield line[:cut]
                line = line[cut:].lstrip()
            if line:
                yield line


def train_tokenizer(inputs: list[str], output_prefix: str, vocab_size: int = 8000, model_type: str = "bpe",
                    json_key: str = "text", text_mode: str = "file", byte_fallback: bool = True,
                    user_defined_symbols: Optional[list[str]] = None, character_coverage: float = 0.9995,
                    max_sentence_length: int = 16384, input_sentence_size: int = 2_000_000,
                    num_threads: int = 1, seed: int = 1234, quiet: bool = False) -> dict:
    """Train and write PREFIX.{model,vocab,json}; returns the metadata written to PREFIX.json."""
    import sentencepiece as spm
    from tqdm import tqdm

    if model_type not in ("bpe", "unigram"):
        raise DataPrepError(f"--model-type {model_type!r} is invalid; use 'bpe' or 'unigram'")
    if vocab_size < 8:
        raise DataPrepError(f"--vocab-size {vocab_size} is too small; use at least a few hundred")
    files = expand_inputs(inputs)
    symbols = [s for s in (user_defined_symbols or []) if s]
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # SentencePiece records its model_prefix inside the model; canonical_model_bytes removes it below, so the same
    # inputs give the same file wherever they are trained.
    tmp = os.path.join(out_dir, f".{os.path.basename(output_prefix)}.tokenizer-partial")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        bar = tqdm(desc="tokenizer: reading documents", unit=" docs", disable=quiet, mininterval=0.5)
        sentences = _sentences(iter_documents(files, json_key, text_mode), max_sentence_length, bar)
        spm.set_random_generator_seed(seed)
        try:
            spm.SentencePieceTrainer.Train(
                sentence_iterator=sentences, model_prefix=os.path.join(tmp, "tok"), vocab_size=vocab_size,
                model_type=model_type, byte_fallback=byte_fallback, character_coverage=character_coverage,
                user_defined_symbols=symbols, unk_id=UNK, bos_id=BOS, eos_id=EOS, pad_id=PAD,
                max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True, num_threads=num_threads, minloglevel=2,
            )
        except RuntimeError as e:
            raise DataPrepError(f"SentencePiece could not train a {vocab_size}-piece {model_type} model on "
                                f"{len(files)} file(s): {e}. A smaller --vocab-size or more text may help") from None
        finally:
            bar.close()
        model_file = os.path.join(tmp, "tok.model")
        with open(model_file, "rb") as f:
            canonical = canonical_model_bytes(f.read())
        with open(model_file, "wb") as f:  # in the temporary directory: committed below
            f.write(canonical)
        meta = {
            "vocab_size": vocab_size, "model_type": model_type, "unk_id": UNK, "bos_id": BOS, "eod_id": EOS,
            "pad_id": PAD, "byte_fallback": byte_fallback, "user_defined_symbols": symbols,
            "character_coverage": character_coverage, "seed": seed, "sources": [os.path.abspath(f) for f in files],
            "model_sha256": sha256_file(os.path.join(tmp, "tok.model")),
            "tokenizer_id": tokenizer_identity(os.path.join(tmp, "tok.model")),
        }
        atomic_write_json(os.path.join(tmp, "tok.json"), meta)
        if os.path.exists(output_prefix + ".json"):
            os.remove(output_prefix + ".json")  # the old tokenizer is no longer complete from here on
        for ext in (".model", ".vocab", ".json"):  # .json last: its presence means complete
            os.replace(os.path.join(tmp, "tok" + ext), output_prefix + ext)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(f"tokenizer: {vocab_size} pieces ({model_type}) -> {output_prefix}.model (EOD id {EOS}, PAD id {PAD})")
    return meta


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="Files or directories: .txt[.gz|.xz], "
                   ".jsonl[.gz|.xz], .json, .parquet.")
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX.model, PREFIX.vocab, PREFIX.json.")
    p.add_argument("--json-key", default="text", help="Text field of JSONL lines / parquet column (default text).")
    p.add_argument("--text-mode", default="file", choices=TEXT_MODES,
                   help="For text files: one document per file, per line, or per blank-line paragraph.")
    p.add_argument("--vocab-size", type=int, default=8000, help="Pieces in the vocabulary (default 8000).")
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece algorithm.")
    p.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="Encode characters outside the vocabulary as UTF-8 bytes instead of <unk> (default on).")
    p.add_argument("--user-defined-symbols", default="", help="Comma-separated strings that are always one piece.")
    p.add_argument("--character-coverage", type=float, default=0.9995,
                   help="Fraction of characters the vocabulary must cover (default 0.9995).")
    p.add_argument("--max-sentence-length", type=int, default=16384,
                   help="Longest training line in bytes; longer lines are split, not dropped.")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="Lines SentencePiece samples for training (0 = all).")
    p.add_argument("--num-threads", type=int, default=1,
                   help="SentencePiece threads (default 1: deterministic output).")
    p.add_argument("--seed", type=int, default=1234, help="Seed for SentencePiece's sampling.")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        train_tokenizer(a.input, a.output_prefix, a.vocab_size, a.model_type, a.json_key, a.text_mode,
                        a.byte_fallback, a.user_defined_symbols.split(","), a.character_coverage,
                        a.max_sentence_length, a.input_sentence_size, a.num_threads, a.seed)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
