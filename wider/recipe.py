"""What every entry script in recipes/ does: parse, patch, train, exit with a clear status."""

from __future__ import annotations

import sys
import warnings


def main(arch: str, doc: str, argv=None) -> int:
    quiet_libraries()  # before anything imports megatron-core, which warns at import time
    from wider import cli

    cfg = cli.parse(argv, description=doc, default_preset=_default_preset(arch), arch=arch)
    import patches

    patches.apply_defaults()
    from wider.config import ConfigError
    from wider.data import DataError
    from wider.training import loop

    try:
        outcome = loop.run(cfg)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        from wider import parallel

        parallel.destroy()
    return 0 if outcome.reason in ("finished", "exit_at_iter", "preempted") else 1


def _default_preset(arch: str) -> str:
    return {"gpt": "gpt_smoke", "gpt_moe": "switch_smoke"}.get(arch, f"{arch}_smoke")


def quiet_libraries() -> None:
    """Keep the console to wider's own lines: DeepSpeed's INFO chatter and known-harmless warnings off."""
    import logging

    warnings.filterwarnings("ignore", message=".*Apex (is|are) not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
