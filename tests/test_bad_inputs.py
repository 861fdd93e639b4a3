"""Bad inputs end with a clear message and exit code 2: the recipe's own main in this process (each case would
otherwise pay an interpreter's start and megatron-core's import), and once through a fresh process."""

from __future__ import annotations

import shutil

import pytest

from conftest import TINY, run_recipe


def _copy_dataset(embedded, tmp_path):
    prefix = tmp_path / "data"
    for ext in (".bin", ".idx"):
        shutil.copy(embedded["prefix"] + ext, str(prefix) + ext)
    return str(prefix)


class Result:
    def __init__(self, returncode: int, stderr: str):
        self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def run(tmp_path, capsys):
    """recipes/pretrain_gpt.py's main in this process: its exit code and what it printed on stderr; it must not have
    written its run directory."""
    from wider import recipe

    def go(args):
        try:
            code = recipe.main("gpt", "", [*TINY, "--train-iters", "2", "--run-dir", str(tmp_path / "run"), *args])
        except SystemExit as e:  # the command line's own errors (argparse)
            code = e.code
        assert not (tmp_path / "run").exists(), "a refused run wrote its run directory"
        return Result(code, capsys.readouterr().err)
    return go


def test_missing_dataset(embedded, tmp_path):
    """Through a fresh interpreter: the exit code of the process."""
    p = run_recipe([*TINY, "--train-iters", "2", "--run-dir", str(tmp_path / "run"), "--data-path",
                    str(tmp_path / "nothing"), "--tokenizer", embedded["tokenizer"]], timeout=180)
    assert p.returncode == 2
    assert "nothing.bin" in p.stderr and "does not exist" in p.stderr and "preprocess_data.py" in p.stderr


def test_truncated_bin(embedded, tmp_path, run):
    prefix = _copy_dataset(embedded, tmp_path)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(1000)
    p = run(["--data-path", prefix, "--tokenizer", embedded["tokenizer"]])
    assert p.returncode == 2 and "truncated" in p.stderr


def test_damaged_index(embedded, tmp_path, run):
    prefix = _copy_dataset(embedded, tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(20)
    p = run(["--data-path", prefix, "--tokenizer", embedded["tokenizer"]])
    assert p.returncode == 2 and "data.idx" in p.stderr and "damaged" in p.stderr


def test_tokenizer_that_does_not_match_the_data(embedded, tmp_path, run):
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text("a small other corpus with few words\n" * 200)
    spm.SentencePieceTrainer.Train(input=str(text), model_prefix=str(tmp_path / "small"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    p = run(["--data-path", embedded["prefix"], "--tokenizer", str(tmp_path / "small.model")])
    assert p.returncode == 2 and ("tokenized with" in p.stderr or "another tokenizer" in p.stderr), p.stderr[-2000:]


def test_model_vocab_smaller_than_tokenizer(data_args, tmp_path, run):
    p = run([*data_args, "--vocab-size", "100"])
    assert p.returncode == 2 and "model.vocab_size 100 is smaller" in p.stderr


def test_missing_tokenizer(embedded, tmp_path, run):
    p = run(["--data-path", embedded["prefix"], "--tokenizer", str(tmp_path / "no.model")])
    assert p.returncode == 2 and "no.model" in p.stderr and "train_tokenizer.py" in p.stderr


@pytest.mark.parametrize("content,needle", [
    ('{"zero_optimization": {"stage": 1}', "not valid JSON"),
    ('{"zero_optimisation": {"stage": 1}}', "did you mean 'zero_optimization'"),
])
def test_malformed_ds_config(data_args, tmp_path, run, content, needle):
    path = tmp_path / "ds.json"
    path.write_text(content)
    p = run([*data_args, "--ds-config", str(path)])
    assert p.returncode == 2 and needle in p.stderr


def test_unknown_preset(tmp_path, run):
    p = run(["--preset", "gpt_huge"])
    assert p.returncode == 2 and "unknown preset 'gpt_huge'" in p.stderr
