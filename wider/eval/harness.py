"""lm-evaluation-harness adapter: `lm_eval --model wider --model_args checkpoint=RUN_DIR --tasks ...`.

WiderLM is an `lm_eval.api.model.LM` over wider.eval.scoring.Scorer, the engine recipes/evaluate.py uses, so a
task scored by both gives the same numbers (the EOD-first rows, left truncation and tokenization of
(context, continuation) pairs are described in wider/eval/scoring.py):
- loglikelihood: log P(continuation | context) and whether greedy decoding reproduces it;
- loglikelihood_rolling: the whole string in disjoint seq_length windows after one EOD, every token scored once,
  the last window with a full context (lm-evaluation-harness's definition);
- generate_until: greedy decoding with wider.generation's key/value cache (the architecture's `incremental`
  factory; a full recompute for architectures without one), stopped at EOD, at max_gen_toks, or as soon as
  one of the `until` strings appears (the text is cut before it). MoE runs dropless while generating
  (wider.generation.inference_mode says why). Sampling (do_sample) is refused: the adapter decodes greedily.

model_args: checkpoint=PATH (a run directory, a checkpoint directory or a release directory; required),
dtype=auto|fp32|bf16|fp16 (auto: bf16 on CUDA, fp32 on CPU), device=cpu|cuda|cuda:N (else lm_eval's --device,
whose default cuda:0 falls back to the CPU when no CUDA device is there, as lm-eval's hf model does),
batch_size=N (else lm_eval's --batch_size, default 1; `auto` = the run's micro-batch size), dropless=true (MoE
without capacity: scores that do not depend on how lm-eval batches requests), max_gen_toks=N (default 256).

How `--model wider` is found. lm-eval 0.4.13 has no plugin discovery: `lm_eval.api.registry.get_model` looks a
name up in a registry that only `lm_eval.models` fills (from its fixed MODEL_MAPPING), and only when the
registry is still empty. Two ways in:
1. `python -m wider.eval.harness ARGS...` (this module) registers "wider" and runs lm_eval's own CLI with ARGS;
   it works in any environment where wider and lm-eval import.
2. the plain `lm_eval` / `lm-eval` / `python -m lm_eval` commands of an environment where wider is installed:
   ./run.sh's set-up installs a one-line .pth file into the venv's site-packages (`wider-lm-eval-hook install`,
   wider/eval/lm_eval_hook.py). The line imports the INSTALLED package's hook by module name (no path to any
   checkout), which adds an import hook that, right after `lm_eval.models` has filled the registry, registers
   "wider" as a lazy entry ("wider.eval.harness:WiderLM"). Nothing is imported until lm-eval itself loads its
   models, lm-eval's files are not touched (a reinstall keeps working), and `pip install lm-eval` cannot overwrite
   it the way it would overwrite a replaced `lm_eval` script. Registering at that moment matters: registering
   before lm_eval.models is imported would leave the registry non-empty, so lm-eval would never load its own
   models (hf, vllm, ...).
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

from lm_eval.api.model import LM

MODEL_NAME = "wider"
TARGET = "wider.eval.harness:WiderLM"
_log = logging.getLogger(__name__)


def _bool(v) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("1", "true", "yes"):
        return True
    if str(v).lower() in ("0", "false", "no", "none", ""):
        return False
    raise ValueError(f"model_args: {v!r} is not a boolean; use true or false")


class WiderLM(LM):
    """A wider checkpoint as an lm-evaluation-harness model (the module docstring lists the model_args)."""

    def __init__(self, checkpoint: Optional[str] = None, device: Optional[str] = None, dtype: str = "auto",
                 batch_size=None, max_batch_size=None, dropless=False, max_gen_toks: int = 256, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"--model wider does not take model_args {sorted(unknown)}; it takes checkpoint=PATH, "
                             "device, dtype, batch_size, dropless, max_gen_toks")
        if not checkpoint:
            raise ValueError("--model wider needs --model_args checkpoint=PATH (a run directory, a checkpoint "
                             "directory or a release directory made by recipes/export.py)")
        import patches
        from wider.devices import resolve_device, resolve_dtype
        from wider.eval import session

        patches.apply_defaults()
        import torch

        device = str(device) if device else "auto"
        if device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's --device defaults to cuda:0 even when not given; fall back as its hf model does.
            _log.warning("wider: --device %s but no CUDA device is available; using the CPU", device)
            device = "cpu"
        dev = resolve_device(device)
        dt = resolve_dtype(str(dtype), dev)
        bs = str(batch_size) if batch_size is not None else ""
        if bs.startswith("auto"):  # lm_eval's --batch_size auto: no search here; the run's micro-batch size
            bs = ""
        if bs and (not bs.isdigit() or int(bs) < 1):
            raise ValueError(f"batch_size {batch_size!r} must be a positive integer")
        loaded = session.load(str(checkpoint), dev, dt, _bool(dropless))
        self._attach(loaded, session.make_scorer(loaded, dev, int(bs) if bs else None, progress=True), dev,
                     max_gen_toks)
        _log.info(session.header(self.loaded, self.scorer, dt))

    @classmethod
    def from_loaded(cls, loaded, scorer, device, max_gen_toks: int = 256, progress: bool = True) -> "WiderLM":
        """A WiderLM over a model that is already loaded (wider.eval.session.load) and its scorer: what
        recipes/evaluate.py tasks hands to lm-eval's evaluator, so that the checkpoint is read once. progress:
        False keeps the scorer's progress bars off (lm-eval's evaluator never asks for that itself)."""
        lm = cls.__new__(cls)
        LM.__init__(lm)
        lm._attach(loaded, scorer, device, max_gen_toks, progress)
        return lm

    def _attach(self, loaded, scorer, device, max_gen_toks: int, progress: bool = True) -> None:
        self.loaded, self.scorer, self._device = loaded, scorer, device
        self.max_gen_toks, self.progress = int(max_gen_toks), progress

    # lm-eval builds the model as cls(**model_args, **{batch_size, max_batch_size, device} from its own flags), so
    # device= or batch_size= inside --model_args would collide with its defaults (TypeError): model_args win here.
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "WiderLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "WiderLM":
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    # --- properties lm-eval reads ---------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"sentencepiece-{self.loaded.tokenizer.identity[:16]}"

    @property
    def eot_token_id(self) -> int:
        return self.scorer.eod

    @property
    def max_length(self) -> int:
        return self.scorer.seq_length

    @property
    def batch_size(self) -> int:
        return self.scorer.batch_size

    # --- requests -----------------------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        pairs = [tuple(r.args) for r in requests]
        self.scorer.progress = self.progress and not disable_tqdm
        out = [(ll, greedy) for ll, greedy, _ in self.scorer.loglikelihood_text(pairs, "lm-eval loglikelihood")]
        for args, res in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        import numpy as np

        strings = [r.args[0] for r in requests]
        streams = [np.asarray([self.scorer.eod, *self.loaded.tokenizer.tokenize(s)], dtype=np.int64) for s in strings]
        self.scorer.progress = self.progress and not disable_tqdm
        sums = self.scorer.stream_nll(streams, None, "lm-eval rolling", apply_loss_mask=False)
        out = [-nll for nll, _ in sums]
        for s, res in zip(strings, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), res)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        from tqdm import tqdm

        out = []
        for r in tqdm(requests, desc="lm-eval generate_until", disable=disable_tqdm or not self.progress):
            context, kwargs = r.args
            text = self.greedy_until(context, dict(kwargs or {}))
            self.cache_hook.add_partial("generate_until", (context, kwargs), text)
            out.append(text)
        return out

    def greedy_until(self, context: str, kwargs: dict) -> str:
        """Greedy continuation of EOD + context (left-truncated to leave room for the new tokens)."""
        import torch

        from wider import generation
        from wider.models import ARCHITECTURES
        from wider.moe import stats as moe_stats

        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise ValueError("the wider lm-eval model decodes greedily; drop do_sample / temperature from the "
                             "task's generation_kwargs (or --gen_kwargs)")
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        L = self.scorer.seq_length
        max_new = max(1, min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), L - 1))
        tok = self.loaded.tokenizer
        prompt = [self.scorer.eod, *tok.tokenize(context)][-(L - max_new):]
        model = self.loaded.model
        arch = ARCHITECTURES[self.loaded.config.model.arch]
        new: list[int] = []
        with generation.inference_mode(model):
            try:
                step = arch.incremental(model, 1, len(prompt) + max_new)
            except NotImplementedError:
                step = generation.FullRecompute(model, 1, len(prompt) + max_new)
            inputs_BN = torch.tensor([prompt], dtype=torch.long, device=self._device)
            for _ in range(max_new):
                moe_stats.clear(model)
                logits_BV = step(inputs_BN)[:, :tok.vocab_size]  # padded vocabulary rows are never chosen
                nxt = int(logits_BV.float().argmax(-1))
                if nxt == self.scorer.eod:
                    break
                new.append(nxt)
                if until and any(u in tok.detokenize(new) for u in until):
                    break
                inputs_BN = torch.tensor([[nxt]], dtype=torch.long, device=self._device)
            moe_stats.clear(model)
        text = tok.detokenize(new)
        for u in until:
            if u:
                text = text.split(u, 1)[0]
        return text


def register() -> None:
    """Make `--model wider` known to lm-eval's registry (idempotent)."""
    import lm_eval.models  # noqa: F401 - fills the registry; get_model imports it only while it is empty
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def main(argv: Optional[list] = None) -> int:
    """`python -m wider.eval.harness ARGS...` = `lm_eval ARGS...` with the wider model registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
