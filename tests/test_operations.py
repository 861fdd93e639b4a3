"""A run as an operator meets it (README "Operations", DESIGN.md 4.4): inputs checked before anything starts or is
written, run directories owned and locked, damaged checkpoints passed over, messages instead of tracebacks, run
directories that work from anywhere. Most checks call the pre-flight in this process (the same code every rank and
`wider-launch` run); the launches that signals and failures need are in test_training.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import PY, REPO, TINY, child_env, explain
from test_training import two_ranks  # noqa: F401 - the session's two-rank run with checkpoints at steps 3 and 6

from wider import cli, preflight
from wider.config import ConfigError
from wider.data import DataError


def _cfg(data_args, run_dir, *extra):
    return cli.parse([*TINY, *data_args, "--train-iters", "6", "--run-dir", str(run_dir), *extra])


def _copy(run, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _snapshot(run_dir) -> dict:
    """Every file of a run directory with its size and modification time."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), run_dir)] = (st.st_size, st.st_mtime_ns)
    return out


# --- nothing written by a run that is refused ------------------------------------------------------------------

def test_a_refused_resume_names_what_differs_and_writes_nothing(data_args, two_ranks, tmp_path):  # noqa: F811
    """Another shape, or another preset altogether (what failed inside DeepSpeed's load before), is refused by our
    message before anything is written; the advised --config RUN_DIR/config.json is the run's own and passes."""
    run = _copy(two_ranks, tmp_path)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match=r"model\.num_layers 2 \(now 3\).*--config .*config\.json"):
        preflight.check(_cfg(data_args, run, "--resume", "auto", "--num-layers", "3"), 2)
    with pytest.raises(ConfigError, match=r"another model config: .*model\.arch 'gpt' \(now 'widenet'\)"):
        preflight.check(cli.parse(["--preset", "widenet_smoke", *data_args, "--run-dir", str(run), "--resume", "auto"]),
                        2)
    assert _snapshot(run) == before
    advised = cli.parse(["--config", str(run / "config.json"), "--resume", "auto", "--run-dir", str(run)])
    assert preflight.check(advised, 2).resume_from.endswith("step_00000006")


def test_wider_launch_refuses_invalid_input_before_any_rank_in_one_line(data_args, tmp_path):
    """Through the launcher ./run.sh uses: one line naming the value and the flags, exit 2, no rank started,
    nothing created (the figure of seconds is in benchmarks/RESULTS.md)."""
    run_dir = tmp_path / "run"
    t0 = time.time()
    p = subprocess.run([PY, "-m", "wider.launch", "--num_gpus", "2", "recipes/pretrain_widenet.py", *data_args,
                        "--train-iters", "20", "--run-dir", str(run_dir)], cwd=REPO, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    elapsed = time.time() - t0
    assert p.returncode == 2, explain(p)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == ["error: train.warmup_iters 30 exceeds train_iters 20 (flags: --warmup-iters, --train-iters)"]
    assert "launch.py" not in p.stdout + p.stderr and not run_dir.exists()
    assert elapsed < 60, elapsed  # a sanity bound only: no rank may have been started


@pytest.mark.parametrize("extra, needle", [
    (["--ds-set", "fp16=true"], "'fp16' must be an object"),
    (["--ds-set", "train_batch_size=abc"], "train_batch_size must be a number"),
    (["--ds-set", "moe.ep_size=3", "--arch", "gpt_moe", "--num-experts", "4"], "not divisible by moe.ep_size 3"),
    (["--warmup-iters", "30"], "warmup_iters 30 exceeds"),
])
def test_bad_values_are_messages_not_tracebacks(data_args, tmp_path, extra, needle):
    with pytest.raises((ConfigError, SystemExit)) as e:
        preflight.check(_cfg(data_args, tmp_path / "run", *extra), 2)
    assert isinstance(e.value, SystemExit) or needle in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


def test_flags_are_not_abbreviated_and_errors_name_the_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--save-int", "3"])  # used to mean --save-interval silently
    assert e.value.code == 2 and "unrecognized arguments: --save-int" in capsys.readouterr().err
    assert cli.with_flags("train.warmup_iters 30 exceeds train_iters 20") == \
        "train.warmup_iters 30 exceeds train_iters 20 (flags: --warmup-iters, --train-iters)"


# --- the run directory is owned by one run ---------------------------------------------------------------------

def test_a_locked_run_directory_is_refused_with_its_holder(data_args, tmp_path):
    from wider.files import RunDirLock

    run_dir = tmp_path / "run"
    lock = RunDirLock(str(run_dir))
    assert lock.acquire()
    try:
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on "):
            preflight.check(_cfg(data_args, run_dir), 2)
        assert not RunDirLock(str(run_dir)).acquire()  # a second holder cannot take it either
    finally:
        lock.release()
    assert RunDirLock.holder(str(run_dir)) is None
    preflight.check(_cfg(data_args, run_dir), 2)


def test_a_fresh_start_refuses_another_runs_directory(data_args, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(_cfg(data_args, run_dir, "--num-layers", "3").to_dict()))
    with pytest.raises(ConfigError, match="holds another run"):
        preflight.check(_cfg(data_args, run_dir), 2)
    preflight.check(_cfg(data_args, run_dir, "--num-layers", "3"), 2)  # the same run, retried: fine


# --- resume verifies before it loads ---------------------------------------------------------------------------

def _damage(run, how: str):
    step6 = run / "checkpoints" / "step_00000006"
    if how == "missing shard":
        (step6 / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    elif how == "truncated states":
        with open(step6 / "mp_rank_00_model_states.pt", "r+b") as f:
            f.truncate(os.path.getsize(step6 / "mp_rank_00_model_states.pt") - 100)
    elif how == "missing rng":
        (step6 / "rng_rank00001.pt").unlink()


@pytest.mark.parametrize("how, reason", [("missing shard", "lacks zero_pp_rank_1"),
                                         ("truncated states", "cannot be read|damaged or truncated"),
                                         ("missing rng", "lacks rng_rank00001.pt")])
def test_a_damaged_latest_checkpoint_is_passed_over_with_its_reason(data_args, two_ranks, tmp_path,  # noqa: F811
                                                                    how, reason):
    import re

    run = _copy(two_ranks, tmp_path)
    _damage(run, how)
    pre = preflight.check(_cfg(data_args, run, "--resume", "auto", "--ds-config", "ds_configs/cpu_zero2.json"), 2)
    assert pre.resume_from.endswith("step_00000003")
    assert re.search(reason, pre.notes[0]) and "step_00000006" in pre.notes[0], pre.notes
    with pytest.raises(ConfigError, match=reason):  # named explicitly: refused, not silently replaced
        preflight.check(_cfg(data_args, run, "--resume", str(run / "checkpoints" / "step_00000006")), 2)


def test_no_intact_checkpoint_and_an_incomplete_one_are_errors(data_args, two_ranks, tmp_path):  # noqa: F811
    run = _copy(two_ranks, tmp_path)
    for step in ("step_00000003", "step_00000006"):
        (run / "checkpoints" / step / "rng_rank00000.pt").unlink()
    with pytest.raises(ConfigError, match="no intact checkpoint"):
        preflight.check(_cfg(data_args, run, "--resume", "auto"), 2)
    (run / "checkpoints" / "step_00000006" / "complete.json").unlink()
    with pytest.raises(ConfigError, match="is incomplete"):
        preflight.check(_cfg(data_args, run, "--resume", str(run / "checkpoints" / "step_00000006")), 2)


# --- quiet, portable tools -------------------------------------------------------------------------------------

def test_info_json_is_the_only_thing_on_stdout(tmp_path):
    p = subprocess.run([PY, "-m", "wider.info", "--preset", "gpt_smoke", "--json"], cwd=tmp_path, env=child_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, explain(p)
    assert json.loads(p.stdout)["preset"] == "gpt_smoke"


def test_a_direct_launch_builds_its_op_inside_the_environment(monkeypatch):
    from wider.recipe import quiet_libraries

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    quiet_libraries()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    assert os.environ["DS_ACCELERATOR"] in ("cpu", "cuda")


def test_a_missing_embedded_corpus_says_how_to_prepare_it(embedded, tmp_path):
    from wider.data import SentencePieceTokenizer, check_indexed_dataset

    with pytest.raises(DataError, match=r"\./run\.sh prepare"):
        check_indexed_dataset(str(tmp_path / "kjv_text_document"), SentencePieceTokenizer(embedded["tokenizer"]))


def test_the_same_corpus_gives_the_same_tokenizer_anywhere(tmp_path):
    """Trained in two directories, the same text gives byte-identical files (SentencePiece's recorded training path
    is removed); the identity is the content, so an older file that still carries its path is recognised too."""
    from data_prep.train_tokenizer import tokenizer_identity, train_tokenizer
    from sentencepiece import sentencepiece_model_pb2

    from wider.data import SentencePieceTokenizer

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of a small corpus with some words in it\n" for i in range(300)))
    a = train_tokenizer([str(text)], str(tmp_path / "a" / "tok"), vocab_size=400, quiet=True)
    b = train_tokenizer([str(text)], str(tmp_path / "elsewhere" / "b" / "tok"), vocab_size=400, quiet=True)
    assert (tmp_path / "a" / "tok.model").read_bytes() == (tmp_path / "elsewhere" / "b" / "tok.model").read_bytes()
    assert a["tokenizer_id"] == b["tokenizer_id"]
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "a" / "tok.model").read_bytes())
    proto.trainer_spec.model_prefix = "/some/other/checkout/tok"
    (tmp_path / "old.model").write_bytes(proto.SerializeToString())
    old = SentencePieceTokenizer(str(tmp_path / "old.model"))
    assert old.sha256 != SentencePieceTokenizer(str(tmp_path / "a" / "tok.model")).sha256
    assert old.identity == a["tokenizer_id"] == tokenizer_identity(str(tmp_path / "a" / "tok.model"))
    assert old.matches({"tokenizer_id": a["tokenizer_id"], "tokenizer_sha256": "different bytes"})


def test_a_copied_run_directory_works_from_anywhere(data_args, two_ranks, tmp_path, monkeypatch):  # noqa: F811
    """Copied elsewhere and used from another directory, with the tokenizer path its config names gone: the run
    directory's own tokenizer copy serves loading, export and resume checks; relative data paths resolve against
    the directory the run was launched from (data.base_dir)."""
    from wider.checkpoint import export, load_for_inference
    from wider.config import DataConfig

    run = _copy(two_ranks, tmp_path / "moved")
    for step in ("step_00000003", "step_00000006"):  # as if trained with a tokenizer that is gone
        states = run / "checkpoints" / step / "mp_rank_00_model_states.pt"
        import torch

        sd = torch.load(states, weights_only=False)
        sd["config"]["data"]["tokenizer"] = str(tmp_path / "gone" / "tokenizer.model")
        torch.save(sd, states)
        marker = json.loads((run / "checkpoints" / step / "complete.json").read_text())
        marker["files"]["mp_rank_00_model_states.pt"] = os.path.getsize(states)
        (run / "checkpoints" / step / "complete.json").write_text(json.dumps(marker))
    monkeypatch.chdir(tmp_path)
    loaded = load_for_inference(str(run))
    assert loaded.tokenizer.path == str(run / "tokenizer.model")
    export(str(run), str(tmp_path / "release"), progress=False, log=lambda *_: None)

    data = DataConfig(data_path=["data/corpus"], tokenizer="data/tok.model", base_dir=str(tmp_path / "launch"))
    (tmp_path / "launch" / "data").mkdir(parents=True)
    (tmp_path / "launch" / "data" / "tok.model").write_bytes(b"x")
    (tmp_path / "launch" / "data" / "corpus.bin").write_bytes(b"x")
    assert data.tokenizer_path == str(tmp_path / "launch" / "data" / "tok.model")
    assert data.prefixes()[0] == [str(tmp_path / "launch" / "data" / "corpus")]


def test_export_never_replaces_the_run_or_anything_it_did_not_make(two_ranks, tmp_path):  # noqa: F811
    from wider.checkpoint import CheckpointError, export

    run = _copy(two_ranks, tmp_path)
    before = _snapshot(run)
    for out in (run, tmp_path, run / "checkpoints" / "step_00000006"):
        with pytest.raises(CheckpointError, match="holds the checkpoint being exported"):
            export(str(run), str(out), force=True, progress=False, log=lambda *_: None)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("a user's file")
    with pytest.raises(CheckpointError, match="replaces only a release"):
        export(str(run), str(other), force=True, progress=False, log=lambda *_: None)
    assert (other / "mine.txt").read_text() == "a user's file" and _snapshot(run) == before
    release = export(str(run), str(tmp_path / "rel"), progress=False, log=lambda *_: None)
    export(str(run), release, force=True, progress=False, log=lambda *_: None)  # an earlier release: replaced


def test_evaluate_refuses_an_output_dir_that_is_a_file(two_ranks, tmp_path, capsys):  # noqa: F811
    from wider.commands.evaluate import main

    (tmp_path / "file").write_text("x")
    rc = main(["perplexity", "--checkpoint", str(two_ranks), "--output-dir", str(tmp_path / "file")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a file, not a directory" in err and "Traceback" not in err


def test_the_expert_load_figure_has_axes_labels_numbers_and_a_colour_bar():
    from wider.training.metrics import load_figure

    fig = load_figure([("block00", [0.4, 0.3, 0.2, 0.1]), ("block01", [0.25, 0.25, 0.25, 0.25])], step=7)
    ax, bar = fig.axes
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "MoE call"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["block00", "block01"]
    assert sorted(t.get_text() for t in ax.texts)[:2] == ["0.40", "0.80"] and len(ax.texts) == 8
    assert bar.get_ylabel() == "share x E" and "step 7" in ax.get_title()
