"""A trained model opened for evaluation: the loading, scoring set-up and description that recipes/evaluate.py
(wider.eval.run) and the lm-evaluation-harness adapter (wider.eval.harness) share."""

from __future__ import annotations

import os
from typing import Optional

import torch

from wider.devices import dtype_name
from wider.eval.scoring import EvalError, Scorer
from wider.moe.config import MoEConfig
from wider.moe.layer import configure, model_routing, moe_layers


def output_dir_for(path: str) -> str:
    """The run directory of a run / checkpoint path, or the (release) directory itself."""
    p = os.path.abspath(path)
    if os.path.isdir(os.path.join(p, "checkpoints")):
        return p
    parent = os.path.dirname(p)
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent)
    return p


def load(path: str, device: torch.device, dtype: torch.dtype, dropless: bool = False,
         ec_routing: Optional[str] = None):
    """wider.checkpoint.load_for_inference (a run directory, a checkpoint directory or a release directory),
    then dropless MoE if asked for, and expert-choice layers on the evaluation routing `ec_routing` (None: the
    run's moe.ec_eval_routing)."""
    if not os.path.exists(path):
        raise EvalError(f"--checkpoint {path!r} does not exist; give a run directory (RUN_DIR), a checkpoint "
                        "(RUN_DIR/checkpoints/step_XXXXXXXX) or a release directory made by recipes/export.py")
    from wider.checkpoint import load_for_inference

    loaded = load_for_inference(path, device=device, dtype=dtype, task="causal_lm")
    if dropless:
        configure(loaded.model, MoEConfig.dropless)
    if ec_routing is not None:
        layers = [m for m in moe_layers(loaded.model) if m.config.selection == "expert_choice"]
        if not layers:
            raise EvalError(f"--ec-routing {ec_routing}: this model has no expert-choice MoE layer (its routing is "
                            f"{model_routing(loaded.model) or 'dense'}); drop --ec-routing")
        try:
            configure(loaded.model, lambda c: c.with_eval_routing(ec_routing))
        except ValueError as e:
            raise EvalError(f"--ec-routing {ec_routing}: {e}") from None
    return loaded


def make_scorer(loaded, device: torch.device, batch_size: Optional[int], progress: bool = True) -> Scorer:
    """batch_size None = the run's micro-batch size (MoE capacity then sees the token count of the run's own
    evaluation batches)."""
    bs = loaded.config.train.micro_batch_size if batch_size is None else batch_size
    return Scorer(loaded.model, loaded.tokenizer, loaded.config, device, bs, progress)


def moe_mode(loaded) -> str:
    layers = moe_layers(loaded.model)
    if not layers:
        return "dense"
    if all(layer.config.selection == "expert_choice" for layer in layers):
        # Expert choice takes its training capacity factor in every routing but token choice (dropless there).
        factors = {layer.config.settings.capacity_factor for layer in layers}
        return f"expert-choice capacity factor {', '.join(str(f) for f in factors)}"
    factors = {layer.config.settings.capacity_factor_for(False) for layer in layers}
    return "dropless" if factors == {None} else f"eval capacity factor {', '.join(str(f) for f in factors)}"


def header(loaded, scorer: Scorer, dtype: torch.dtype) -> str:
    m = loaded.config.model
    step = "?" if loaded.step is None else loaded.step
    routing = model_routing(loaded.model)
    return (f"wider eval | {loaded.source} (step {step}) | arch {m.arch} | seq {m.seq_length} | "
            f"{scorer.device} | {dtype_name(dtype)} | batch {scorer.batch_size} | moe: {moe_mode(loaded)}"
            f"{f' | routing: {routing}' if routing else ''}")
