"""Command line for the recipes: `--preset NAME` plus one flag per config field.

Flags are generated from the dataclasses in wider/config.py, so `--help` documents every field with the
text written where it is declared. Only flags given on the command line override the preset.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Optional, Sequence

from wider import presets
from wider.config import ConfigError, RunConfig
from wider.models import validate


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_value(kind, text: str):
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union and type(None) in args:  # Optional[X]
        if text.lower() in ("none", "null"):
            return None
        return _parse_value(next(a for a in args if a is not type(None)), text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    return text


def build_parser(description: str, default_preset: str) -> argparse.ArgumentParser:
    epilog = "presets:\n" + "\n".join(f"  {n:<16} {d}" for n, d in presets.describe())
    p = argparse.ArgumentParser(allow_abbrev=False, description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=default_preset, help=f"Named preset (default {default_preset}); see below.")
    p.add_argument("--config", default=None, help="A resolved config JSON (e.g. RUN_DIR/config.json) to start "
                                                  "from instead of a preset; flags still override it.")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    seen: dict[str, str] = {}
    hints = {sec: typing.get_type_hints(type(obj)) for sec, obj in RunConfig().sections().items()}
    for sec, obj in RunConfig().sections().items():
        g = p.add_argument_group(f"{sec} ({type(obj).__name__})")
        for f in dataclasses.fields(obj):
            assert f.name not in seen, f"flag clash: {sec}.{f.name} and {seen[f.name]}.{f.name}"
            seen[f.name] = sec
            kind = hints[sec][f.name]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            helptext = f"{f.metadata.get('help', '')} [{sec}.{f.name}; base default {default!r}]"
            dest = f"{sec}.{f.name}"
            if kind is bool:
                g.add_argument(_flag(f.name), dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=helptext)
            elif typing.get_origin(kind) is list or kind is list:
                g.add_argument(_flag(f.name), dest=dest, nargs="+", default=argparse.SUPPRESS, help=helptext)
            else:
                g.add_argument(_flag(f.name), dest=dest, default=argparse.SUPPRESS, help=helptext,
                               type=lambda s, k=kind, n=f.name: _checked(k, s, n), metavar=f.name.upper())
    return p


def _checked(kind, text: str, name: str):
    try:
        return _parse_value(kind, text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: {text!r} is not a valid "
                                         f"{getattr(kind, '__name__', str(kind))}") from None


def parse(argv: Optional[Sequence[str]] = None, description: str = "", default_preset: str = "gpt_smoke",
          arch: Optional[str] = None, task: Optional[str] = None) -> RunConfig:
    """Parse the command line into a validated-for-shape RunConfig (parallel layout checked later). arch / task: the
    recipe's own (a preset of another architecture or task is refused with the recipe that trains it)."""
    import json

    parser = build_parser(description, default_preset)
    ns = parser.parse_args(argv)
    try:
        if ns.config:
            with open(ns.config) as f:
                cfg = RunConfig.from_dict(json.load(f))
        else:
            cfg = presets.get(ns.preset)
        given = {k.split(".", 1)[1] for k in vars(ns) if "." in k}
        if given & {"granularity", "expansion_rate", "base_top_k"}:
            from wider.config import FINE_GRAINED_DERIVED

            clash = sorted(given & set(FINE_GRAINED_DERIVED))
            if clash:
                raise ConfigError(f"--{clash[0].replace('_', '-')} is derived from --granularity / --expansion-rate "
                                  "/ --base-top-k; give one description of the experts, not both")
            # A new G or E re-derives the expert count, top-k and width that a preset or config already holds.
            cfg.model.num_experts, cfg.model.moe_top_k, cfg.model.moe_ffn_hidden_size = 0, 2, None
        if "labels" in given and "num_labels" not in given:
            cfg.model.num_labels = 0  # a new label set re-derives the classifier's size (wider.config)
        for key, value in vars(ns).items():
            if "." in key:
                sec, name = key.split(".", 1)
                if key == "train.ds_set":  # adds to the preset's overrides (later ones win)
                    value = list(cfg.train.ds_set) + list(value)
                setattr(getattr(cfg, sec), name, value)
        if arch is not None and cfg.model.arch != arch:
            raise ConfigError(f"preset {cfg.preset!r} builds model.arch {cfg.model.arch!r}, but this recipe trains "
                              f"{arch!r}; use the recipe for {cfg.model.arch!r} or another preset")
        if task is not None and cfg.model.task != task:
            from wider.tasks import recipe_for

            raise ConfigError(f"preset {cfg.preset!r} trains model.task {cfg.model.task!r}, but this recipe trains "
                              f"{task!r}; use {recipe_for(cfg.model.arch, cfg.model.task)} or another preset")
        validate(cfg)
    except (ConfigError, OSError, json.JSONDecodeError) as e:
        parser.exit(2, f"error: {with_flags(str(e))}\n")
    return cfg


_FIELD = re.compile(r"\b(model|data|train)\.([a-z_]+)\b")


def with_flags(message: str) -> str:
    """A config error with the command-line flag of every field it names, when it does not name one itself:
    "train.warmup_iters 30 exceeds train_iters 20" -> "... (flags: --warmup-iters, --train-iters)"."""
    fields = dict.fromkeys(m.group(2) for m in _FIELD.finditer(message))
    fields.update(dict.fromkeys(f for f in re.findall(r"\b([a-z]+_[a-z_]+)\b", message) if f in _all_fields()))
    flags = [_flag(f) for f in fields if f in _all_fields() and _flag(f) not in message]
    return f"{message} (flags: {', '.join(flags)})" if flags else message


def _all_fields() -> set:
    return {f.name for sec in RunConfig().sections().values() for f in dataclasses.fields(sec)}


def add_model_arguments(group, dtypes=("auto", "fp32", "bf16")) -> None:
    """The --checkpoint / --device / --dtype flags of every tool that loads a model with load_for_inference
    (recipes/evaluate.py, recipes/generate.py; wider.checkpoint.load_for_inference), on an argparse group."""
    group.add_argument("--checkpoint", required=True, metavar="PATH",
                       help="a run directory (its latest complete checkpoint), one checkpoint directory "
                            "(RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py; "
                            "the tokenizer and config are the run's own")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    group.add_argument("--dtype", default="auto", choices=list(dtypes),
                       help="parameter and compute precision; auto = bf16 on CUDA, fp32 on CPU")
