"""What every training entry script in recipes/ does: parse, patch, train, and exit with a status that says what
happened.

Exit status (the same through ./run.sh, wider-launch and a plain `deepspeed` launch, whose launcher passes a
rank's status on): 0 finished, stopped at --exit-at-iter, or preempted by a signal with its checkpoint complete;
2 invalid input (one line naming the value and the fix, printed by one rank); 1 a failure (a checkpoint that could
not be written: its message; anything else: the traceback); 130 interrupted by a second Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional


def main(arch: Optional[str], doc: str, argv=None, task: str = "causal_lm") -> int:
    """arch: the architecture a language-model recipe trains (recipes/pretrain_<arch>.py); None for the recipes of the
    other tasks (DESIGN 5.8), which train `task` on any architecture that has encoder blocks."""
    quiet_libraries()  # before anything imports megatron-core, which warns at import time
    from wider import cli, presets
    from wider.tasks import DEFAULT_PRESETS

    default = presets.default_for(arch) if arch is not None else DEFAULT_PRESETS[task]
    cfg = cli.parse(argv, description=doc, default_preset=default, arch=arch, task=task)
    import patches

    patches.apply_defaults()
    from wider.checkpoint.store import SaveError
    from wider.config import ConfigError
    from wider.data import DataError
    from wider.training import loop

    try:
        outcome = loop.run(cfg)
    except (ConfigError, DataError) as e:
        if str(e):  # empty: another rank printed the reason (wider.preflight.ReportedElsewhere)
            print(f"error: {cli.with_flags(str(e))}", file=sys.stderr, flush=True)
        return 2
    except SaveError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted (a second Ctrl-C): stopped without a checkpoint; --resume auto continues from the last one",
              file=sys.stderr, flush=True)
        return 130
    finally:
        from wider import parallel

        parallel.destroy()
    return 0 if outcome.reason in ("finished", "exit_at_iter", "preempted") else 1


def quiet_libraries() -> None:
    """Keep the console to wider's own lines, and make a direct launch behave like ./run.sh's. Called first by
    every entry point:
    - DS_ACCELERATOR: without it DeepSpeed probes for CUDA and prints "Setting accelerator to CPU" on stdout
      (which broke `python -m wider.info --json | jq`);
    - TORCH_EXTENSIONS_DIR: DeepSpeed JIT-builds its CPU communication op there; ./run.sh's set-up builds it inside
      the environment (sys.prefix/torch_extensions), so a plain `deepspeed` launch finds it there instead of building
      again in ~/.cache, where a lock left by another checkout's killed build would hold it for ever;
    - DeepSpeed's INFO chatter and known-harmless warnings off."""
    import logging

    if "DS_ACCELERATOR" not in os.environ:
        import torch

        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
    warnings.filterwarnings("ignore", message=".*Apex (is|are) not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
