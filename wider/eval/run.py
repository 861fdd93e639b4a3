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

from wider.eval.scoring import EvalError, Scorer, set_dropless
from wider.files import atomic_write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise EvalError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on CUDA (the precision GPU runs train in), fp32 on CPU (exact comparisons)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise EvalError(f"--dtype {name!r} is invalid; use auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def output_dir_for(path: str) -> str:
    """The run directory of a run / checkpoint path, or the (release) directory itself."""
    p = os.path.abspath(path)
    if os.path.isdir(os.path.join(p, "checkpoints")):
        return p
    parent = os.path.dirname(p)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return p


def load(path: str, device: torch.device, dtype: torch.dtype, dropless: bool = False):
    """wider.checkpoint.load_for_inference (a run directory, a checkpoint directory or a release directory),
    then dropless MoE if asked for."""
    if not os.path.exists(path):
        raise EvalError(f"--checkpoint {path!r} does not exist; give a run directory (RUN_DIR), a checkpoint "
                        "(RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py")
    from wider.checkpoint import load_for_inference

    loaded = load_for_inference(path, device=str(device), dtype=dtype)
    if dropless:
        set_dropless(loaded.model)
    return loaded


def make_scorer(loaded, device: torch.device, batch_size: Optional[int], progress: bool = True) -> Scorer:
    """batch_size None = the run's micro-batch size (MoE capacity then sees the token count of the run's own
    evaluation batches)."""
    bs = loaded.config.train.micro_batch_size if batch_size is None else batch_size
    return Scorer(loaded.model, loaded.tokenizer, loaded.config, device, bs, progress)


def moe_mode(loaded) -> str:
    from wider.moe import stats as moe_stats

    layers = moe_stats.moe_layers(loaded.model)
    if not layers:
        return "dense"
    factors = {layer.settings.capacity_factor_for(False) for layer in layers}
    return "dropless" if factors == {None} else f"eval capacity factor {', '.join(str(f) for f in factors)}"


def header(loaded, scorer: Scorer, dtype: torch.dtype) -> str:
    m = loaded.config.model
    step = "?" if loaded.step is None else loaded.step
    return (f"wider eval | {loaded.source} (step {step}) | arch {m.arch} | seq {m.seq_length} | "
            f"{scorer.device} | {str(dtype).replace('torch.', '')} | batch {scorer.batch_size} | moe: {moe_mode(loaded)}")


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
    return {"device": str(scorer.device), "dtype": str(dtype).replace("torch.", ""), "batch_size": scorer.batch_size,
            "limit": a.limit, "moe": moe_mode(loaded), **extra}


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
    loaded = load(a.checkpoint, device, dtype, a.dropless)
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
    """recipes/evaluate.py tasks: zero-shot tasks from local files."""
    from wider.eval import tasks as T

    names = T.resolve_names(a.tasks)
    overrides = parse_task_files(a.task_file)
    unknown = sorted(set(overrides) - set(T.TASKS))
    if unknown:
        raise EvalError(f"--task-file names unknown task(s) {unknown}; available: {', '.join(sorted(T.TASKS))}")
    paths = {n: T.task_path(n, a.task_dir, overrides) for n in names}  # every file checked before loading
    device = resolve_device(a.device)
    dtype = resolve_dtype(a.dtype, device)
    loaded = load(a.checkpoint, device, dtype, a.dropless)
    scorer = make_scorer(loaded, device, a.batch_size, not a.no_progress)
    out_dir = a.output_dir or output_dir_for(a.checkpoint)
    print(header(loaded, scorer, dtype), flush=True)
    all_metrics = {}
    for n in names:
        t0 = time.time()
        scorer.truncated = 0
        metrics = T.evaluate_task(scorer, n, paths[n], a.limit)
        metrics["truncated_requests"] = scorer.truncated
        record(out_dir, n, "task", loaded, metrics, _settings(a, scorer, dtype, loaded, path=os.path.abspath(paths[n])),
               not a.no_write)
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                           if k in ("acc", "acc_norm", "ppl", "acc_macro"))
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

    errors: tuple = (EvalError, DataError, ConfigError)
    try:
        from wider.checkpoint import CheckpointError  # the loader's own error class, when it has one

        errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        return perplexity(a) if a.command == "perplexity" else tasks(a)
    except errors as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
