"""Release directories: a checkpoint consolidated into files that need neither DeepSpeed nor a process group.

    RELEASE/
      model.safetensors    every parameter (and persistent buffer) by name, fp32 or bf16, experts stacked
                           [E, ...] as the ep_size-1 model holds them (from the fp32 master weights)
      config.json          the resolved RunConfig (preset, model, data, train) plus "moe": the resolved ds_config
                           "moe" block at ep_size 1 (null for a dense model): enough to rebuild the model exactly
      tokenizer.model      the SentencePiece model the run trained with (+ tokenizer.json, its metadata, if present);
                           none for a task without text (image classification, wider.config.tokenized)
      metadata.json        format, step, source checkpoint, dtype, parameter counts, the training layout
      README.md            the same for people, with the line that loads it
      optimizer.safetensors, trainer_state.json   only with --with-optimizer: Adam exp_avg / exp_avg_sq by
                           parameter name, the Adam step and the LR-scheduler state

Written to a temporary directory beside the target and moved into place with os.replace at the end, so a crash
or Ctrl-C never leaves a half-written release under the target name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Optional

import torch

from wider.checkpoint.native import consolidate, inspect, moe_block
from wider.checkpoint.paths import (RELEASE_CONFIG as CONFIG, RELEASE_METADATA as METADATA,
                                    RELEASE_OPTIMIZER as OPTIMIZER, RELEASE_TOKENIZER as TOKENIZER,
                                    RELEASE_TOKENIZER_META as TOKENIZER_META, RELEASE_TRAINER_STATE as TRAINER_STATE,
                                    RELEASE_WEIGHTS as WEIGHTS, CheckpointError, is_release_dir, resolve)
from wider.checkpoint.rebuild import (build_for_config, load_tensors, run_config_of, run_tokenizer_candidates,
                                      tokenizer_for)
from wider.files import atomic_write_json, atomic_write_text

FORMAT = "wider-release"
FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_release(path: str) -> dict:
    """The release's metadata, config (RunConfig, tokenizer pointed at the release's copy) and moe block."""
    from wider.config import RunConfig
    from wider.moe.settings import MoESettings

    path = os.path.abspath(path)
    with open(os.path.join(path, METADATA)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path!r}: metadata.json says format {meta.get('format')!r} version "
                              f"{meta.get('format_version')!r}; this wider reads {FORMAT!r} version {FORMAT_VERSION}")
    from wider.config import tokenized

    if not os.path.isfile(os.path.join(path, CONFIG)):
        raise CheckpointError(f"release {path!r} lacks {CONFIG}; export it again with recipes/export.py")
    with open(os.path.join(path, CONFIG)) as f:
        d = json.load(f)
    moe_block = d.pop("moe", None)
    cfg = RunConfig.from_dict(d)
    if tokenized(cfg.model) and not os.path.isfile(os.path.join(path, TOKENIZER)):
        raise CheckpointError(f"release {path!r} lacks {TOKENIZER}; export it again with recipes/export.py")
    cfg.data.tokenizer = os.path.join(path, TOKENIZER)
    moe = MoESettings.from_block(moe_block, f"release {path!r} config.json") if moe_block is not None else None
    return {"meta": meta, "config": cfg, "moe": moe}


def export(source: str, out_dir: str, dtype: str = "fp32", force: bool = False, with_optimizer: bool = False,
           progress: bool = True, log=print) -> str:
    """Consolidate a run directory (its latest complete checkpoint) or a checkpoint directory into a release
    directory at out_dir. Returns out_dir. Refuses an existing out_dir unless force."""
    from safetensors.torch import save_file

    from wider.config import tokenized
    from wider.data import model_vocab_size
    from wider.models import ARCHITECTURES

    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    kind, ckpt = resolve(source)
    if kind == "release":
        raise CheckpointError(f"{source!r} is already a release directory; export takes a run directory or a "
                              "checkpoint directory (load a release with wider.from_pretrained)")
    out_dir = os.path.abspath(out_dir)
    check_output(out_dir, ckpt, force)
    info = inspect(ckpt)
    cfg = run_config_of(info)
    tok = (tokenizer_for(run_tokenizer_candidates(ckpt, cfg), info.client, f"checkpoint {ckpt!r}")
           if tokenized(cfg.model) else None)
    moe = moe_block(info, ep_size=1)
    vocab = model_vocab_size(cfg.model, tok.vocab_size) if tok is not None else 0
    log(f"export: {ckpt} (step {info.step}, dp {info.dp}, ep_size {info.ep_size}, ZeRO {info.zero_stage}, "
        f"{'bf16' if info.bf16 else 'fp32'}) -> {out_dir} ({dtype})")
    cons = consolidate(ckpt, optimizer=with_optimizer, info=info, progress=progress)
    model = build_for_config(cfg, moe, vocab)
    load_tensors(model, cons.weights, f"checkpoint {ckpt!r}")  # the release will load: check it now
    counts = ARCHITECTURES[cfg.model.arch].count(cfg, vocab)
    want = DTYPES[dtype]
    tensors = {k: (v.to(want) if v.is_floating_point() else v).contiguous() for k, v in cons.weights.items()}

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(tensors, os.path.join(tmp, WEIGHTS), metadata={"format": FORMAT, "dtype": dtype})
        config = cfg.to_dict()
        config["moe"] = dataclasses.asdict(moe) if moe is not None else None
        atomic_write_json(os.path.join(tmp, CONFIG), config)
        if tok is not None:
            shutil.copyfile(tok.path, os.path.join(tmp, TOKENIZER))
            tok_meta = os.path.splitext(tok.path)[0] + ".json"  # data_prep/train_tokenizer.py writes PREFIX.json
            if os.path.isfile(tok_meta):
                shutil.copyfile(tok_meta, os.path.join(tmp, TOKENIZER_META))
        params = dict(model.named_parameters())
        stored = sum(t.numel() for n, t in tensors.items() if n in params)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": info.step, "source": ckpt,
                "dtype": dtype, "arch": cfg.model.arch, "preset": cfg.preset,
                "parameters": {"total": counts.total, "active": counts.active, "embedding": counts.embedding,
                               "non_embedding": counts.non_embedding, "stored": stored},
                "vocab_size": vocab, **(tok.record() if tok is not None else {}), "trained_layout": info.layout(),
                "with_optimizer": with_optimizer, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": _versions()}
        atomic_write_json(os.path.join(tmp, METADATA), meta)
        if with_optimizer:
            opt = {f"{key}.{name}": t.contiguous() for name, d in cons.optimizer.items() for key, t in d.items()}
            save_file(opt, os.path.join(tmp, OPTIMIZER), metadata={"format": FORMAT})
            atomic_write_json(os.path.join(tmp, TRAINER_STATE), {"adam_step": cons.adam_step, "step": info.step,
                                                           "lr_scheduler": _jsonable(cons.lr_scheduler)})
        atomic_write_text(os.path.join(tmp, "README.md"), _readme(meta, cfg, moe))
        umask = os.umask(0)
        os.umask(umask)
        for name in os.listdir(tmp):  # safetensors writes 0600; a release is meant to be shared like any file
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out_dir} ({_fmt_bytes(os.path.getsize(os.path.join(out_dir, WEIGHTS)))} weights, "
        f"{stored:,} parameters, step {info.step})")
    return out_dir


def check_output(out_dir: str, ckpt: str, force: bool) -> None:
    """Refuse an output that would destroy what the user owns: the checkpoint itself or any directory above it (its
    run), and, even with --force, anything but a release an earlier export made."""
    real_out, real_ckpt = os.path.realpath(out_dir), os.path.realpath(ckpt)
    if os.path.commonpath([real_out, real_ckpt]) == real_out:
        raise CheckpointError(f"--output {out_dir!r} holds the checkpoint being exported ({ckpt}); writing the release "
                              "there would replace the run: choose a directory outside it, e.g. releases/NAME")
    if not os.path.lexists(out_dir):
        return
    if not force:
        raise CheckpointError(f"output directory {out_dir!r} already exists; choose another --output or pass "
                              "--force to replace it (only a release made by recipes/export.py can be replaced)")
    if not (os.path.isdir(out_dir) and is_release_dir(out_dir)):
        raise CheckpointError(f"--force replaces only a release made by recipes/export.py, and {out_dir!r} is not one "
                              f"(no {METADATA} + {WEIGHTS}); choose another --output")
    with open(os.path.join(out_dir, METADATA)) as f:
        if json.load(f).get("format") != FORMAT:
            raise CheckpointError(f"--force replaces only a wider release, and {out_dir!r} is another format; choose "
                                  "another --output")


def _move_into_place(tmp: str, out_dir: str) -> None:
    """os.replace cannot replace a non-empty directory: move an old one aside first, then delete it."""
    old = None
    if os.path.lexists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: None)) if obj is not None else None


def _versions() -> dict:
    from importlib.metadata import version

    out = {}
    for pkg in ("torch", "megatron-core", "deepspeed", "safetensors", "sentencepiece"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is simply not recorded
            pass
    return out


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


def _readme(meta: dict, cfg, moe: Optional[object]) -> str:
    m = cfg.model
    p = meta["parameters"]
    lines = [
        f"# {cfg.preset} ({m.arch}) at step {meta['step']}",
        "",
        "Exported by `recipes/export.py` of wider. Load it on CPU or GPU without DeepSpeed or a process group:",
        "",
        "```python",
        "import wider",
        "",
        "loaded = wider.from_pretrained(\"THIS_DIRECTORY\", device=\"cpu\")  # or device=\"cuda\", dtype=torch.bfloat16",
        "logits = loaded.model(tokens, position_ids, None)  # [B, S, V]; labels=... gives the per-token loss",
        "```",
        "",
        f"- weights: `{WEIGHTS}` in {meta['dtype']} (from the fp32 master weights), {p['stored']:,} stored "
        f"parameters (total {p['total']:,}, active per token {p['active']:,}, embedding {p['embedding']:,})",
        f"- model: {m.num_layers} layers x {m.hidden_size}, {m.num_attention_heads} heads, seq {m.seq_length}, "
        f"vocabulary {meta['vocab_size']}" + (f", {m.num_experts} experts top-{m.moe_top_k}" if m.num_experts else ""),
        f"- config: `{CONFIG}` (the run config and the \"moe\" block{' at ep_size 1' if moe is not None else ''})",
        f"- tokenizer: `{TOKENIZER}` (content id {meta['tokenizer_id'][:16]}...)" if meta.get("tokenizer_id") else
        "- tokenizer: none (the task reads no text)",
        f"- source: `{meta['source']}`, trained with {json.dumps(meta['trained_layout'])}",
        f"- created {meta['created']} with {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
    ]
    if meta["with_optimizer"]:
        lines.append(f"- optimizer: `{OPTIMIZER}` (exp_avg.NAME, exp_avg_sq.NAME) and `{TRAINER_STATE}`")
    return "\n".join(lines) + "\n"
