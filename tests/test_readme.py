"""Every command the README shows, executed (those that run on a CPU), so that the README cannot drift from the code.

Commands are read from README.md: lines of code blocks and inline code that start with ./run.sh, python, wider-,
lm_eval, deepspeed or .venv/bin/python. Mentions (a bare command name, or syntax with placeholders such as PRESET,
PATH, ARGS, ...) are not invocations. Every concrete command must have an entry in CASES, which says how it is
checked: run as written (in this process where the tool has a main, to keep the suite fast), run with small sizes
substituted (a corpus of a few documents, a vocabulary of hundreds, a trained tiny run for runs/widenet_smoke), its
training flags parsed and every input checked by the pre-flight (training commands: test_default_run and
test_training run the launch itself), or skipped with the reason (GPU, network, this suite, a server). A command
added to the README without an entry fails the test.
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import PY, REPO, child_env, explain
from test_eval import LM_TASKS, task_dir  # noqa: F401 - tiny local files of the six zero-shot tasks
from test_training import two_ranks  # noqa: F401 - a trained run with checkpoints (stands in for runs/widenet_smoke)

PREFIX = re.compile(r"^(\./run\.sh|python |wider-|lm_eval |deepspeed |\.venv/bin/python)")
PLACEHOLDER = re.compile(r"\b[A-Z]{2,}\b|\.\.\.|\|")


def readme_commands() -> list[str]:
    lines = (REPO / "README.md").read_text().split("\n")
    out, fenced, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            fenced = not fenced
        elif (fenced or line.startswith("    ")) and PREFIX.match(line.strip()):
            cmd = line.strip()
            while cmd.endswith("\\"):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            out.append(re.sub(r"\s+#.*$", "", cmd))
        elif not (fenced or line.startswith("    ")):
            out += [m.group(1) for m in re.finditer(r"`([^`]+)`", line) if PREFIX.match(m.group(1))]
        i += 1
    return list(dict.fromkeys(out))


def concrete(cmd: str) -> bool:
    """An invocation: no placeholder, and arguments (a bare `python -m wider.info` or `wider-launch` names a tool;
    a bare ./run.sh is the default run)."""
    if PLACEHOLDER.search(cmd):
        return False
    words = shlex.split(cmd)
    if words[:2] == ["python", "-m"]:
        return len(words) > 3
    return len(words) > 1 or words == ["./run.sh"]


SKIP_GPU = "needs a CUDA GPU (its CPU twin runs)"
CASES = {
    "./run.sh": "train",  # test_default_run runs it (fewer steps); here its flags are checked
    "./run.sh test": "skip: this suite",
    "./run.sh test -k resume": "skip: this suite",
    '.venv/bin/python -c "import wider"': "subprocess",
    "./run.sh gpt_smoke --num-layers 6": "train",
    "./run.sh fine_smoke --moe-router expert_choice": "train",
    "./run.sh fine_smoke --router-bias --router-score sigmoid --router-renormalize --shared-experts 1 "
    "--ds-set moe.aux_loss_weight=0": "train",
    "./run.sh --help": "subprocess",
    "python recipes/pretrain_widenet.py --help": "inprocess",
    "./run.sh info fine_512x8 --granularity 16": "inprocess",
    "./run.sh info widenet_l --plan --world-size 64 --global-batch-size 512 --ds-set moe.ep_size=4": "inprocess",
    "python data_prep/train_tokenizer.py --input corpus/*.jsonl.gz --json-key text --vocab-size 32000 "
    "--output-prefix data/tok": "inprocess",
    "python data_prep/preprocess_data.py --input corpus/*.jsonl.gz --json-key text --tokenizer data/tok.model "
    "--output-prefix data/my_text_document --workers 8": "inprocess",
    "./run.sh gpt_125m --data-path data/my_text_document --tokenizer data/tok.model --run-dir runs/my125m": "train",
    "wider-launch --num_gpus 8 recipes/pretrain_gpt.py --preset gpt_350m --data-path data/my_text_document "
    "--tokenizer data/tok.model --run-dir runs/gpt350m": "train",
    "deepspeed --hostfile hostfile recipes/pretrain_gpt.py --preset gpt_1b3 --tensor-parallel 2 --resume auto "
    "--run-dir /shared/runs/gpt1b3": "train",
    "./run.sh tensorboard": "skip: starts a server that runs until stopped",
    "python recipes/export.py --source runs/widenet_smoke --output releases/widenet_smoke": "inprocess",
    "python recipes/export.py --source runs/widenet_b/checkpoints/step_00020000 --output releases/widenet_b "
    "--dtype bf16": "inprocess",
    "python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke": "inprocess",
    "python recipes/evaluate.py perplexity --checkpoint runs/widenet_smoke --text held_out.jsonl.gz --json-key text "
    "--stride 64": "inprocess",
    "python recipes/evaluate.py perplexity --checkpoint runs/gpt350m --data-path data/my_text_document "
    "--device cuda": f"skip: {SKIP_GPU}",
    "python recipes/evaluate.py tasks --checkpoint runs/widenet_smoke --tasks lambada,blimp,piqa,hellaswag,arc_easy,cbt "
    "--task-dir data/tasks": "inprocess",
    "lm_eval --model wider --model_args checkpoint=runs/widenet_smoke --tasks hellaswag --batch_size 8":
        "skip: lm-eval downloads hellaswag from the Hugging Face hub (the same adapter runs local tasks below)",
    "python -m wider.eval.harness --model wider --model_args checkpoint=runs/widenet_smoke --tasks my_task "
    "--include_path my_tasks/": "subprocess",
    'python recipes/generate.py --checkpoint runs/widenet_smoke --prompt "In the beginning" --max-new-tokens 60':
        "inprocess",
    "python recipes/generate.py --checkpoint runs/widenet_smoke --prompt-file prompts.jsonl --json-key text "
    "--num-samples 4 --temperature 0.8 --top-p 0.9 --seed 7 --output samples.jsonl": "inprocess",
    'python recipes/generate.py --checkpoint runs/widenet_smoke --prompt "In the beginning" --no-cache': "inprocess",
    # The tasks (DESIGN 5.8). ./run.sh launches a task preset through its task's recipe (wider.tasks.recipe_for), and
    # so does _check_training; tests/test_task_runs.py trains the smoke presets through the launcher.
    "./run.sh prepare masked_lm": "subprocess",  # cached in cache/embedded_mlm, shared with tests/test_tasks.py
    "./run.sh prepare image_classification": "subprocess",
    "./run.sh widenet_mlm_smoke": "train",  # tests/test_task_runs.py trains the smoke presets
    "./run.sh widenet_vit_smoke": "train",
    "./run.sh widenet_finetune_smoke --init-from runs/widenet_mlm_smoke":
        "skip: needs the widenet_mlm_smoke run (tests/test_task_runs.py fine-tunes from a pretraining run)",
    "deepspeed --num_gpus 8 recipes/pretrain_mlm.py --preset widenet_mlm_8e --data-path data/wiki_sentence_document "
    "--tokenizer data/wiki.model --run-dir runs/widenet_mlm_8e": "skip: needs a Wikipedia dump prepared as shown",
    "deepspeed --num_gpus 8 recipes/pretrain_mlm.py --preset widenet_mlm_16e --ds-set moe.ep_size=4 --resume auto":
        "train",
    "python data_prep/preprocess_data.py --input wiki/ --text-mode paragraph --sentences lines --no-append-eod "
    "--tokenizer data/wiki.model --output-prefix data/wiki_sentence_document --workers 8":
        "skip: needs a Wikipedia dump (tests/test_tasks.py builds the embedded corpus with sentences='lines')",
    "deepspeed --num_gpus 1 recipes/finetune.py --config runs/widenet_mlm_8e/config.json --task classification "
    "--init-from runs/widenet_mlm_8e --train-data glue/CoLA/train.tsv --valid-data glue/CoLA/dev.tsv --no-tsv-header "
    "--text-columns 3 --label-column 1 --labels 0 1 --metric mcc --train-iters 800 --global-batch-size 32 --lr 2e-5 "
    "--warmup-iters 80 --run-dir runs/cola": "skip: needs GLUE files and a pretrained widenet_mlm_8e run",
    "deepspeed --num_gpus 8 recipes/train_vit.py --preset widenet_vit_b16 --train-data data/imagenet/train "
    "--valid-data data/imagenet/val --ds-set moe.ep_size=4 --resume auto": "skip: needs ImageNet files",
    "python -m wider.study list": "subprocess",
    "python -m wider.study run smoke --jobs 2": "subprocess",  # tests/test_study.py checks what it writes
    "python -m wider.study plan widenet --scale cpu": "subprocess",
    "python -m wider.study run widenet --scale cpu --jobs 2": "skip: 12 runs, about 20 minutes on two cores (the smoke "
                                                               "study runs the same code)",
    "python -m wider.study run granularity --scale cpu --jobs 2 --lr-grid 1e-3,3e-3,1e-2":
        "skip: 36 runs, an hour on two cores (the smoke study runs the same code; tests/test_study.py the grid's "
        "bookkeeping)",
    "python -m wider.study report widenet --scale cpu": "subprocess",  # on the smoke study run above (SUBSTITUTE)
    "python -m wider.study plan umoe --scale gpu --mfu 0.2": "subprocess",
    'python -m wider.study run umoe --scale gpu --launcher "deepspeed --num_gpus 8" -- --data-path '
    "data/my_text_document --tokenizer data/tok.model": f"skip: {SKIP_GPU}",
    **{f"python benchmarks/{b}.py": "skip: a GPU benchmark by default (its --cpu runs are recorded in "
       "benchmarks/RESULTS.md); minutes, not a test" for b in ("moe_layer", "train_step", "saved_activations",
                                                               "moe_profile")},
}
# Small sizes for the CPU (the README's figures are for real corpora and GPUs).
SUBSTITUTE = {"--vocab-size 32000": "--vocab-size 400", "--workers 8": "--workers 2",
              "--max-new-tokens 60": "--max-new-tokens 8", "--num-samples 4": "--num-samples 2",
              "--output samples.jsonl": "--output samples.jsonl --max-new-tokens 8", "--no-cache": "--no-cache --max-new-tokens 8",
              "report widenet --scale cpu": "report smoke --scale cpu"}


def test_every_readme_command_has_a_case():
    cmds = [c for c in readme_commands() if concrete(c)]
    assert len(cmds) >= 20
    assert sorted(set(cmds) - set(CASES)) == []
    assert sorted(set(CASES) - set(cmds)) == []  # no stale entries


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, two_ranks, task_dir):  # noqa: F811
    """A directory laid out as the README's commands expect: a corpus, a trained run under runs/widenet_smoke and
    runs/widenet_b/checkpoints/step_00020000, task files, prompts, held-out text, a local lm-eval task."""
    import shutil

    d = tmp_path_factory.mktemp("readme")
    (d / "corpus").mkdir()
    docs = [f"Chapter {i}. And it came to pass in the {i}th year that the people went up to the city." for i in range(60)]
    with gzip.open(d / "corpus" / "books.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    with gzip.open(d / "held_out.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs[:3])
    (d / "prompts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("And God said", "In the")))
    (d / "runs").mkdir()
    shutil.copytree(two_ranks, d / "runs" / "widenet_smoke", ignore=shutil.ignore_patterns(".lock"))
    (d / "runs" / "widenet_b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_ranks / "checkpoints" / "step_00000006",
                    d / "runs" / "widenet_b" / "checkpoints" / "step_00020000")
    shutil.copy(two_ranks / "config.json", d / "runs" / "widenet_b" / "config.json")
    (d / "data").mkdir()
    shutil.copytree(task_dir, d / "data" / "tasks")
    (d / "my_tasks").mkdir()
    (d / "lm").mkdir()
    (d / "lm" / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:2]))
    body = LM_TASKS["wider_rolling_local.yaml"].format(dir=d / "lm", cache=d / "hf_cache")
    (d / "my_tasks" / "my_task.yaml").write_text(body.replace("task: wider_rolling_local", "task: my_task"))
    return d


def _argv(cmd: str) -> list[str]:
    for a, b in SUBSTITUTE.items():
        cmd = cmd.replace(a, b)
    return shlex.split(cmd)


def _run_inprocess(argv: list[str], cwd: Path, monkeypatch) -> int:
    """The tool's own main, in this process, from `cwd`."""
    import glob

    monkeypatch.chdir(cwd)
    argv = [a for arg in argv for a in (sorted(glob.glob(arg)) or [arg])]  # the shell's glob
    if argv[0] == "./run.sh" and argv[1] == "info":
        from wider.info import main

        return main(["--preset", *argv[2:]])
    script, args = argv[1], argv[2:]
    if script == "recipes/pretrain_widenet.py":
        from wider.recipe import main

        with pytest.raises(SystemExit) as e:
            main("widenet", "", args)
        return e.value.code
    if script.startswith("data_prep/"):
        import importlib

        return importlib.import_module(f"data_prep.{Path(script).stem}").main(args)
    import importlib

    return importlib.import_module(f"wider.commands.{Path(script).stem}").main(args)


def _check_training(argv: list[str], workdir) -> None:
    """A training command's flags parsed as its recipe parses them and every input checked (wider.preflight), for
    the world size its launcher line gives; nothing is written. A ./run.sh line without --run-dir is checked against
    a fresh run directory in the work directory (the repository's runs/ may hold the user's own runs of it)."""
    from wider import preflight, presets
    from wider.launch import _recipe_args, world_size
    from wider.tasks import recipe_for

    if argv[0] == "./run.sh":
        rest = argv[1:]
        named = bool(rest) and not rest[0].startswith("-")
        preset = rest[0] if named else "widenet_smoke"  # ./run.sh's DEFAULT_PRESET
        model = presets.get(preset).model
        script = recipe_for(model.arch, model.task)  # as ./run.sh chooses it
        args, world = ["--preset", preset, *(rest[1:] if named else rest)], 2
        if "--run-dir" not in args:
            args += ["--run-dir", str(workdir / "runs" / f"check_{preset}")]
    else:
        script, args = _recipe_args(argv[1:])
        world = world_size(argv[1:]) if "--num_gpus" in argv else None
    assert preflight.main(script, args, world) == 0, argv


@pytest.mark.slow
def test_readme_commands_run(workdir, monkeypatch, capsys):
    for cmd, how in CASES.items():
        if how.startswith("skip"):
            continue
        argv = _argv(cmd)
        if how == "train":
            # The preset's own data (the embedded corpus) is relative to the repository; the README's data/... is
            # what its data_prep commands made in the work directory.
            monkeypatch.chdir(workdir if "data/" in cmd else REPO)
            _check_training(argv, workdir)
        elif how == "inprocess":
            rc = _run_inprocess(argv, workdir, monkeypatch)
            out = capsys.readouterr()
            assert rc in (0, None), (cmd, out.err[-2000:])
        else:
            cwd = REPO if argv[0] == "./run.sh" else workdir
            if argv[0] == ".venv/bin/python":
                argv[0] = str(Path(PY))
            elif argv[0] == "python":
                argv[0] = PY
            p = subprocess.run(argv, cwd=cwd, env=child_env(HF_DATASETS_OFFLINE="1"), capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, (cmd, explain(p))
    # What the commands made is there.
    assert (workdir / "releases" / "widenet_smoke" / "model.safetensors").exists()
    assert (workdir / "releases" / "widenet_b" / "model.safetensors").exists()
    assert (workdir / "data" / "my_text_document.bin").exists() and (workdir / "samples.jsonl").exists()
    assert (workdir / "runs" / "widenet_smoke" / "eval" / "ppl_held_out.json").exists()
    assert (workdir / "runs" / "widenet_smoke" / "eval" / "lambada.json").exists()
