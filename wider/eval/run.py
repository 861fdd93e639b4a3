"""What recipes/evaluate.py does: load a checkpoint, score, print, write JSON and TensorBoard scalars.

Outputs go to the run directory (RUN_DIR for a run directory or one of its checkpoints; the directory itself
for a release made by recipes/export.py; --output-dir otherwise):
- RUN_DIR/eval/<name>.json, written atomically (a temporary file, then os.replace): the metrics, the checkpoint
  and its training step, and the settings that produced them. <name> is ppl_<dataset> for perplexity
  (ppl_valid for the run's own validation split) and the task name for zero-shot tasks.
- TensorBoard scalars eval/<name>/<metric> at the checkpoint's step in RUN_DIR/tensorboard, the directory the
  training run logs to, so they appear beside its curves (a separate event file, suffix .eval).
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from typing import Optional

import torch

from wider.devices import DeviceError, dtype_name, resolve_device, resolve_dtype
from wider.eval.scoring import EvalError, Scorer
from wider.eval.session import header, load, make_scorer, moe_mode, output_dir_for
from wider.moe.layer import model_routing
from wider.files import atomic_write_json


def scalars_of(name: str, metrics: dict, prefix: str = "eval") -> dict:
    """TensorBoard tags for the numeric metrics (standard errors and counts left out), nested dicts (BLiMP's
    paradigms) one level down."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, dict):
            out.update(scalars_of(f"{name}/{k}", v, prefix))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("_stderr") \
                and k not in ("n", "tokens", "documents", "bytes") and v is not None and math.isfinite(v):
            out[f"{prefix}/{name}/{k}"] = float(v)
    return out


def write_tensorboard(out_dir: str, step: int, scalars: dict) -> str:
    """The scalars into out_dir/tensorboard (the training run's TensorBoard directory, wider/training/metrics.py
    Reporter) in an event file of their own."""
    from torch.utils.tensorboard import SummaryWriter

    tb_dir = os.path.join(out_dir, "tensorboard")
    writer = SummaryWriter(tb_dir, filename_suffix=".eval")
    try:
        for tag, v in scalars.items():
            writer.add_scalar(tag, v, step)
    finally:
        writer.flush()
        writer.close()
    return tb_dir


def record(out_dir: str, name: str, kind: str, loaded, metrics: dict, settings: dict, write: bool = True) -> dict:
    payload = {"name": name, "kind": kind, "checkpoint": os.path.abspath(loaded.source), "step": loaded.step,
               "arch": loaded.config.model.arch, "preset": loaded.config.preset,
               "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "settings": settings, "results": metrics}
    if write:
        atomic_write_json(os.path.join(out_dir, "eval", f"{name}.json"), payload)
    return payload


def _settings(a, scorer: Scorer, dtype: torch.dtype, loaded, **extra) -> dict:
    return {"device": str(scorer.device), "dtype": dtype_name(dtype), "batch_size": scorer.batch_size,
            "limit": a.limit, "moe": moe_mode(loaded), **({"routing": routing} if (routing := model_routing(
                loaded.model)) else {}), **extra}


def _dataset_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for ext in (".jsonl.gz", ".jsonl.xz", ".json.gz", ".json.xz", ".txt.gz", ".txt.xz", ".jsonl", ".json",
                ".txt", ".parquet"):
        if base.endswith(ext):
            return base[:-len(ext)]
    return base


def perplexity(a) -> int:
    """recipes/evaluate.py perplexity: the run's validation split (default), --data-path PREFIX or --text FILE."""
    from wider.eval import perplexity as ppl

    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    if a.data_path and a.text:
        raise EvalError("give either --data-path (an indexed dataset) or --text (raw text / JSONL), not both")
    if a.stride is not None and not (a.data_path or a.text):
        raise EvalError("--stride applies to --text / --data-path streams; the validation split is scored as the "
                        "run's own GPTDataset samples (drop --stride, or give --text / --data-path)")
    if (a.data_path or a.text) and (a.data_parallel is not None or a.index_cache is not None):
        raise EvalError("--data-parallel and --index-cache apply to the run's validation split only; drop them with "
                        "--text / --data-path")
    loaded = load(a.checkpoint, device, dtype, a.dropless, a.ec_routing)
    scorer = make_scorer(loaded, device, a.batch_size, not a.no_progress)
    out_dir = a.output_dir or output_dir_for(a.checkpoint)
    print(header(loaded, scorer, dtype), flush=True)
    t0 = time.time()
    extra: dict = {}
    if a.text:
        name = a.name or _dataset_name(a.text[0])
        res = ppl.score_text(scorer, a.text, a.json_key, a.text_mode, a.limit, a.stride)
        extra = {"text": [os.path.abspath(p) for p in a.text], "json_key": a.json_key, "text_mode": a.text_mode,
                 "stride": a.stride or scorer.seq_length}
    elif a.data_path:
        name = a.name or _dataset_name(a.data_path)
        res = ppl.score_indexed(scorer, a.data_path, a.limit, a.stride)
        extra = {"data_path": os.path.abspath(a.data_path), "stride": a.stride or scorer.seq_length}
    else:
        name = a.name or "valid"
        dp = a.data_parallel or ppl.run_data_parallel(loaded.source) or 1
        cache = a.index_cache or loaded.config.data.index_cache or \
            os.path.join(os.path.dirname(output_dir_for(a.checkpoint)), ".index_cache")
        res = ppl.score_validation(scorer, cache, dp, a.limit)
        extra = {"split": "valid", "data_path": loaded.config.data.data_path, "data_parallel": dp}
    metrics = res.to_dict()
    name = "ppl_" + name
    settings = _settings(a, scorer, dtype, loaded, **extra)
    record(out_dir, name, "perplexity", loaded, metrics, settings, not a.no_write)
    bpb = f" | bits/byte {metrics['bits_per_byte']:.4f}" if metrics.get("bits_per_byte") is not None else ""
    print(f"{name}: loss {metrics['loss']:.6f} | ppl {metrics['ppl']:.3f} | {metrics['tokens']:,} tokens{bpb} "
          f"| {time.time() - t0:.1f} s", flush=True)
    _finish(a, out_dir, loaded, {name: metrics})
    return 0


def tasks(a) -> int:
    """recipes/evaluate.py tasks: zero-shot tasks from local files, run by lm-evaluation-harness's evaluator with
    the `wider` lm-eval model (wider/eval/tasks.py)."""
    from importlib.metadata import version

    from wider.eval import tasks as T
    from wider.eval.harness import WiderLM

    names = T.resolve_names(a.tasks)
    overrides = parse_task_files(a.task_file)
    unknown = sorted(set(overrides) - set(T.TASKS))
    if unknown:
        raise EvalError(f"--task-file names unknown task(s) {unknown}; available: {', '.join(sorted(T.TASKS))}")
    paths = {n: T.task_path(n, a.task_dir, overrides) for n in names}
    built = {n: T.build(n, paths[n], a.limit) for n in names}  # every file read and checked before loading
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    loaded = load(a.checkpoint, device, dtype, a.dropless, a.ec_routing)
    scorer = make_scorer(loaded, device, a.batch_size, not a.no_progress)
    lm = WiderLM.from_loaded(loaded, scorer, device, progress=not a.no_progress)
    out_dir = a.output_dir or output_dir_for(a.checkpoint)
    print(header(loaded, scorer, dtype), flush=True)
    all_metrics = {}
    for n in names:
        t0 = time.time()
        scorer.truncated = 0
        metrics = T.evaluate(lm, built[n])
        metrics["truncated_requests"] = scorer.truncated
        settings = _settings(a, scorer, dtype, loaded, path=os.path.abspath(paths[n]), lm_eval=version("lm_eval"))
        record(out_dir, n, "task", loaded, metrics, settings, not a.no_write)
        shown = " | ".join(f"{k} {metrics[k]:.4f}" for k in ("acc", "acc_norm", "ppl", "acc_macro")
                           if metrics.get(k) is not None)
        print(f"{n}: {shown} | n {metrics['n']} | {time.time() - t0:.1f} s", flush=True)
        all_metrics[n] = metrics
    _finish(a, out_dir, loaded, all_metrics)
    return 0


def parse_task_files(items: Optional[list]) -> dict:
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise EvalError(f"--task-file {item!r} is not NAME=PATH (e.g. --task-file lambada=data/lambada_test.jsonl)")
        out[name.strip()] = path
    return out


def _finish(a, out_dir: str, loaded, metrics: dict) -> None:
    if a.no_write:
        return
    scalars = {}
    for name, m in metrics.items():
        scalars.update(scalars_of(name, {k: v for k, v in m.items() if k != "truncated_requests"}))
    tb = write_tensorboard(out_dir, loaded.step or 0, scalars)
    print(f"results        {os.path.join(out_dir, 'eval')}/\ntensorboard    {tb}   (eval/...)", flush=True)


def main(a) -> int:
    """Run a parsed recipes/evaluate.py command; usage and input errors exit 2 with a message."""
    from wider.config import ConfigError
    from wider.data import DataError

    errors: tuple = (EvalError, DeviceError, DataError, ConfigError)  # CheckpointError is a ConfigError
    try:
        if a.output_dir and os.path.exists(a.output_dir) and not os.path.isdir(a.output_dir):
            raise EvalError(f"--output-dir {a.output_dir!r} is a file, not a directory; give a directory (it is "
                            "created when missing)")
        return perplexity(a) if a.command == "perplexity" else tasks(a)
    except errors as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
