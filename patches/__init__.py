"""Opt-in fixes to megatron-core / DeepSpeed, one per file.

Nothing here runs on import. Entry points (recipes) and tests call `patches.apply(...)` explicitly at
start-up. Each patch module states why it exists, the versions it targets, and when to delete it; a test
in tests/test_patches.py fails when upstream changes in a way that makes the patch stale.

    import patches
    patches.apply("rope_cpu", "cpu_rng_tracker", "nonreentrant_recompute", "kv_cache_cpu")
    patches.apply_defaults()   # the same
"""

from __future__ import annotations

import importlib
from importlib.metadata import version

AVAILABLE = ("rope_cpu", "cpu_rng_tracker", "nonreentrant_recompute", "kv_cache_cpu")
DEFAULT = AVAILABLE  # what the recipes apply
_applied: set[str] = set()


def _module(name: str):
    if name not in AVAILABLE:
        raise ValueError(f"unknown patch {name!r}; available: {', '.join(AVAILABLE)}")
    return importlib.import_module(f"patches.{name}")


def apply(*names: str) -> list[str]:
    """Apply the named patches (idempotent). Returns the names applied by this call. A patch whose
    target package version differs from the one it was written for refuses with an explanation."""
    done = []
    for name in names:
        if name in _applied:
            continue
        mod = _module(name)
        installed = version(mod.PACKAGE)
        if installed not in mod.VERSIONS:
            raise RuntimeError(
                f"patch {name} targets {mod.PACKAGE} {', '.join(mod.VERSIONS)} but {installed} is installed: "
                f"check whether upstream fixed the problem (see patches/{name}.py) and update or delete it")
        mod.apply()
        _applied.add(name)
        done.append(name)
    return done


def apply_defaults() -> list[str]:
    return apply(*DEFAULT)


def applied() -> set[str]:
    return set(_applied)
