"""Tokenize documents into a megatron-core indexed dataset (PREFIX.bin / PREFIX.idx).

    python data_prep/preprocess_data.py --input my.jsonl --json-key text --tokenizer data/tok.model \
        --output-prefix data/my_text_document --workers 4
    python data_prep/preprocess_data.py --input shards/ --tokenizer data/tok.model --output-prefix data/web

One document per entry, the end-of-document id appended to each (--no-append-eod to skip), written with
megatron-core's own IndexedDatasetBuilder. --sentences lines writes each non-empty line of a document as a sequence of
its own, the document kept as their group: the layout megatron-core's BERT dataset reads (sentences, documents), which
wider's masked-LM task trains on (put one sentence per line; with --append-eod the id ends each document's last
sentence) (uint16 tokens for vocabularies below 65,500, int32 above), so
megatron-core's GPTDataset and IndexedDataset read it directly. PREFIX.json records the counts, the tokenizer
and its SHA-256 (the training run checks it against the tokenizer it is given).

Atomic output: everything is written to temporary files first; only after success is PREFIX.json removed, the
.bin and .idx moved into place, and PREFIX.json written last. An interrupted or failed run leaves any previous
dataset untouched and no half-written dataset that looks valid.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from typing import Iterator, Optional

from data_prep.documents import DataPrepError, TEXT_MODES, expand_inputs, iter_documents
from data_prep.train_tokenizer import tokenizer_identity
from wider.files import atomic_write_json, sha256_file

_worker_sp = None
SENTENCE_MODES = ("none", "lines")


def _init_worker(model_path: str) -> None:
    global _worker_sp
    import sentencepiece as spm

    _worker_sp = spm.SentencePieceProcessor(model_file=model_path)


def _encode_chunk(docs: list[str]) -> list[list[int]]:
    return _worker_sp.encode(docs)


def _lines(doc: str) -> list[str]:
    return [line.strip() for line in doc.split("\n") if line.strip()]


def _encode_sentence_chunk(docs: list[str]) -> list[list[list[int]]]:
    return [_worker_sp.encode(_lines(d)) for d in docs]


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def preprocess(inputs: list[str], tokenizer_model: str, output_prefix: str, workers: int = 1,
               json_key: str = "text", text_mode: str = "file", append_eod: bool = True, chunk_size: int = 64,
               quiet: bool = False, _documents: Optional[Iterator[str]] = None, sentences: str = "none") -> dict:
    """Tokenize inputs into OUTPUT_PREFIX.{bin,idx,json}; returns the summary written to the .json.
    `_documents` replaces reading `inputs` (tests use it to inject failures). sentences: "none" (one sequence per
    document) or "lines" (one sequence per non-empty line, grouped by document)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    import numpy as np
    import sentencepiece as spm
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    if not os.path.isfile(tokenizer_model):
        raise DataPrepError(f"tokenizer {tokenizer_model!r} does not exist; train one with "
                            "data_prep/train_tokenizer.py")
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    except Exception as e:
        raise DataPrepError(f"tokenizer {tokenizer_model!r} is not a SentencePiece model ({e})") from None
    vocab = sp.get_piece_size()
    eod = sp.eos_id()
    if append_eod and eod < 0:
        raise DataPrepError(f"tokenizer {tokenizer_model!r} has no end-of-sequence piece to append; retrain it "
                            "with data_prep/train_tokenizer.py or pass --no-append-eod")
    if workers < 1:
        raise DataPrepError(f"--workers {workers} must be at least 1")
    if sentences not in SENTENCE_MODES:
        raise DataPrepError(f"--sentences {sentences!r} is invalid; use one of {', '.join(SENTENCE_MODES)}")
    files = expand_inputs(inputs) if _documents is None else list(inputs)
    docs = _documents if _documents is not None else iter_documents(files, json_key, text_mode)
    text_bytes = [0]

    def counted(it):
        for d in it:
            text_bytes[0] += len(d.encode("utf-8"))
            yield d

    docs = counted(docs)
    dtype = np.uint16 if vocab < 65500 else np.int32  # megatron's choice (DType.optimal_dtype)

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_bin, tmp_idx = f"{output_prefix}.bin.tmp-{os.getpid()}", f"{output_prefix}.idx.tmp-{os.getpid()}"
    n_docs = n_tokens = n_bytes = n_empty = n_sentences = 0
    t0 = time.time()
    pool = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        by_lines = sentences == "lines"
        if workers > 1:
            pool = mp.get_context("fork").Pool(workers, initializer=_init_worker, initargs=(tokenizer_model,))
            # imap keeps document order, so the dataset is the same for any number of workers.
            source = pool.imap(_encode_sentence_chunk if by_lines else _encode_chunk, _chunks(docs, chunk_size))
        elif by_lines:
            source = ([sp.encode(_lines(d)) for d in c] for c in _chunks(docs, chunk_size))
        else:
            source = (sp.encode(c) for c in _chunks(docs, chunk_size))
        bar = tqdm(desc="tokenizing", unit=" docs", disable=quiet, mininterval=0.5)
        for ids_list in source:
            for ids in ids_list:
                parts = [p for p in ids if p] if by_lines else ([ids] if ids else [])
                if not parts:
                    n_empty += 1
                    continue
                if append_eod:
                    parts[-1] = parts[-1] + [eod]
                for part in parts:
                    builder.add_item(torch.tensor(part, dtype=torch.int64))
                    n_tokens += len(part)
                builder.end_document()
                n_docs += 1
                n_sentences += len(parts)
            bar.update(len(ids_list))
        bar.close()
        if n_docs == 0:
            raise DataPrepError(f"no non-empty document in {inputs}; check --json-key / --text-mode")
        builder.finalize(tmp_idx)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        n_bytes = text_bytes[0]
        seconds = time.time() - t0
        summary = {
            "documents": n_docs, "empty_documents_skipped": n_empty, "tokens": n_tokens, "text_bytes": n_bytes,
            **({"sentences": n_sentences} if by_lines else {}),
            "bin_bytes": os.path.getsize(tmp_bin), "seconds": round(seconds, 3),
            "tokens_per_second": round(n_tokens / max(seconds, 1e-9)),
            "dtype": np.dtype(dtype).name, "eod_appended": append_eod, "eod_id": eod, "vocab_size": vocab,
            "tokenizer": os.path.abspath(tokenizer_model), "tokenizer_sha256": sha256_file(tokenizer_model),
            "tokenizer_id": tokenizer_identity(tokenizer_model),
            "inputs": [os.path.abspath(f) for f in files] if _documents is None else [],
        }
        # Commit: the old .json goes first (without it the old pair no longer counts as complete), then the
        # data, then the new .json.
        if os.path.exists(output_prefix + ".json"):
            os.remove(output_prefix + ".json")
        os.replace(tmp_bin, output_prefix + ".bin")
        os.replace(tmp_idx, output_prefix + ".idx")
        atomic_write_json(output_prefix + ".json", summary)
    finally:
        if pool is not None:
            pool.terminate()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
    if not quiet:
        mb = n_bytes / 2**20
        print(f"preprocess: {n_docs:,} documents ({n_empty} empty skipped), {n_tokens:,} tokens, "
              f"{mb:.1f} MB of text, .bin {summary['bin_bytes'] / 2**20:.1f} MB, {summary['seconds']:.1f} s, "
              f"{summary['tokens_per_second']:,} tokens/s, {mb / max(summary['seconds'], 1e-9):.1f} MB/s "
              f"-> {output_prefix}.bin/.idx")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="Files or directories: .txt[.gz|.xz], "
                   ".jsonl[.gz|.xz], .json, .parquet.")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model (data_prep/train_tokenizer.py).")
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX.bin, PREFIX.idx, PREFIX.json.")
    p.add_argument("--json-key", default="text", help="Text field of JSONL lines / parquet column (default text).")
    p.add_argument("--text-mode", default="file", choices=TEXT_MODES,
                   help="For text files: one document per file, per line, or per blank-line paragraph.")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="Tokenizer processes (default: cores - 1).")
    p.add_argument("--chunk-size", type=int, default=64, help="Documents per task sent to a worker.")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="Append the end-of-document id to every document (default on).")
    p.add_argument("--sentences", default="none", choices=SENTENCE_MODES,
                   help="'lines': each non-empty line of a document is a sequence (a sentence) of that document, the "
                        "layout of the masked-LM task (megatron-core's BERT dataset); 'none' (default): one sequence "
                        "per document.")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        preprocess(a.input, a.tokenizer, a.output_prefix, a.workers, a.json_key, a.text_mode, a.append_eod,
                   a.chunk_size, sentences=a.sentences)
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
