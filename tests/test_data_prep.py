"""Data preparation: tokenizer round trip, datasets read back by megatron-core's own reader, atomic writes,
bad inputs, and the cached embedded corpus."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, child_env
from data_prep.documents import DataPrepError
from data_prep.preprocess_data import preprocess
from data_prep.train_tokenizer import train_tokenizer

DOCS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse.",
    "",  # empty documents are skipped
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with the ends of worms.",
] * 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    with open(d / "docs.jsonl", "w") as f:
        for i, t in enumerate(DOCS):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    with gzip.open(d / "docs.jsonl.gz", "wt") as f:
        for t in DOCS:
            f.write(json.dumps({"body": t}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), d / "docs.parquet")
    for i, t in enumerate(DOCS[:5]):
        (d / f"doc{i}.txt").write_text(t)
    return d


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    meta = train_tokenizer([str(corpus / "docs.jsonl")], prefix, vocab_size=300, user_defined_symbols=["<sep>"],
                           quiet=True)
    return prefix, meta


def test_tokenizer_round_trip_and_ids(tok):
    import sentencepiece as spm

    prefix, meta = tok
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    assert (meta["unk_id"], meta["bos_id"], meta["eod_id"], meta["pad_id"]) == (0, 1, 2, 3)
    assert sp.eos_id() == 2 and sp.pad_id() == 3 and sp.get_piece_size() == 300
    held_out = "A lazy fox read the purse of a hobbit: naïve café, 東京, and ü — all survive. <sep> end"
    assert sp.decode(sp.encode(held_out)) == held_out  # byte fallback keeps unseen characters
    assert len(sp.encode("<sep>")) <= 2 and sp.piece_to_id("<sep>") != sp.unk_id()
    saved = json.loads(open(prefix + ".json").read())
    assert saved["model_sha256"] == meta["model_sha256"]


def test_tokenizer_is_deterministic(corpus, tmp_path):
    a = train_tokenizer([str(corpus / "docs.jsonl")], str(tmp_path / "a"), vocab_size=300, quiet=True)
    b = train_tokenizer([str(corpus / "docs.jsonl")], str(tmp_path / "a"), vocab_size=300, quiet=True)
    assert a["model_sha256"] == b["model_sha256"]


@pytest.mark.parametrize("name,key,mode", [("docs.jsonl", "text", "file"), ("docs.jsonl.gz", "body", "file"),
                                           ("docs.parquet", "text", "file")])
def test_dataset_read_back_by_megatron(corpus, tok, tmp_path, name, key, mode):
    import numpy as np
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = spm.SentencePieceProcessor(model_file=tok[0] + ".model")
    out = str(tmp_path / "ds")
    summary = preprocess([str(corpus / name)], tok[0] + ".model", out, workers=1, json_key=key, quiet=True)
    expected = [sp.encode(t) + [sp.eos_id()] for t in DOCS if t]
    ds = IndexedDataset(out)
    assert len(ds) == len(expected) == summary["documents"]
    assert summary["empty_documents_skipped"] == DOCS.count("")
    assert ds.index.dtype == np.uint16
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert list(ds.document_indices) == list(range(len(expected) + 1))
    assert summary["tokens"] == sum(map(len, expected))


def test_text_files_and_workers_agree(corpus, tok, tmp_path):
    txt = sorted(str(p) for p in corpus.glob("doc*.txt"))
    one = preprocess(txt, tok[0] + ".model", str(tmp_path / "one"), workers=1, quiet=True)
    two = preprocess(txt, tok[0] + ".model", str(tmp_path / "two"), workers=2, chunk_size=1, quiet=True)
    assert one["documents"] == 4
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"one{ext}").read_bytes() == (tmp_path / f"two{ext}").read_bytes()
    jl = preprocess([str(corpus / "docs.jsonl")], tok[0] + ".model", str(tmp_path / "jl1"), workers=1, quiet=True)
    jl2 = preprocess([str(corpus / "docs.jsonl")], tok[0] + ".model", str(tmp_path / "jl2"), workers=2,
                     chunk_size=3, quiet=True)
    assert jl["tokens"] == jl2["tokens"]
    assert (tmp_path / "jl1.bin").read_bytes() == (tmp_path / "jl2.bin").read_bytes()


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_preprocess_leaves_previous_dataset_intact(corpus, tok, tmp_path, exc):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    out = str(tmp_path / "ds")
    preprocess([str(corpus / "docs.jsonl")], tok[0] + ".model", out, workers=1, quiet=True)
    before = {ext: (tmp_path / f"ds{ext}").read_bytes() for ext in (".bin", ".idx", ".json")}

    def failing():
        yield "a first document"
        yield "a second document"
        raise exc

    with pytest.raises(type(exc)):
        preprocess(["injected"], tok[0] + ".model", out, workers=1, quiet=True, _documents=failing())
    after = {ext: (tmp_path / f"ds{ext}").read_bytes() for ext in (".bin", ".idx", ".json")}
    assert after == before
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx", "ds.json"]  # no temporary files left
    assert len(IndexedDataset(out)) == len([d for d in DOCS if d])

    fresh = str(tmp_path / "fresh")
    with pytest.raises(type(exc)):
        preprocess(["injected"], tok[0] + ".model", fresh, workers=1, quiet=True, _documents=failing())
    assert not any(n.startswith("fresh") for n in os.listdir(tmp_path))


def _cli(script, *args):
    return subprocess.run([sys.executable, f"data_prep/{script}", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_bad_inputs_via_cli(corpus, tok, tmp_path, capsys):
    model = tok[0] + ".model"
    out = str(tmp_path / "x")
    cases = [
        (("preprocess_data.py", "--input", str(tmp_path / "missing.jsonl"), "--tokenizer", model, "--output-prefix",
          out), "missing.jsonl"),
        (("preprocess_data.py", "--input", str(corpus / "docs.jsonl"), "--json-key", "content", "--tokenizer", model,
          "--output-prefix", out), "no key 'content'"),
        (("preprocess_data.py", "--input", str(corpus / "docs.parquet"), "--json-key", "body", "--tokenizer", model,
          "--output-prefix", out), "no column 'body'"),
        (("preprocess_data.py", "--input", str(tok[0] + ".vocab"), "--tokenizer", model, "--output-prefix", out),
         "unsupported extension"),
        (("preprocess_data.py", "--input", str(corpus / "docs.jsonl"), "--tokenizer", str(tmp_path / "no.model"),
          "--output-prefix", out), "no.model"),
        (("train_tokenizer.py", "--input", str(tmp_path / "nothing.txt"), "--output-prefix", out), "nothing.txt"),
    ]
    from data_prep import preprocess_data, train_tokenizer as tokenizer_cli

    mains = {"preprocess_data.py": preprocess_data.main, "train_tokenizer.py": tokenizer_cli.main}
    for i, (args, needle) in enumerate(cases):
        if i == 0:  # one case as a process (its exit code); the others call the same main in this process
            p = _cli(*args)
            code, err = p.returncode, p.stderr
        else:
            code, err = mains[args[0]](list(args[1:])), capsys.readouterr().err
        assert code == 2, (args, err)
        assert needle in err, (needle, err)
    assert not any(n.startswith("x") for n in os.listdir(tmp_path))


def test_invalid_json_line_is_located(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    with pytest.raises(DataPrepError, match=r"bad.jsonl:2: invalid JSON"):
        preprocess([str(bad)], tok[0] + ".model", str(tmp_path / "o"), quiet=True)


def test_embedded_corpus_is_cached(embedded):
    from data_prep.prepare_embedded import prepare_embedded

    paths = [embedded["prefix"] + e for e in (".bin", ".idx", ".json")] + [embedded["tokenizer"]]
    mtimes = [os.path.getmtime(p) for p in paths]
    again = prepare_embedded(out_dir=embedded["out_dir"], quiet=True)
    assert again["cached"] and again["prefix"] == embedded["prefix"]
    assert [os.path.getmtime(p) for p in paths] == mtimes
    meta = json.loads(open(embedded["prefix"] + ".json").read())
    assert meta["documents"] == 1189 and meta["tokens"] > 800_000
