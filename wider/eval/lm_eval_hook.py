"""Make `lm_eval --model wider ...` work wherever wider is installed: an import hook started by a .pth file.

    python -m wider.eval.lm_eval_hook install      # ./run.sh's set-up does this for .venv (also: wider-lm-eval-hook)
    python -m wider.eval.lm_eval_hook uninstall
    python -m wider.eval.lm_eval_hook status

Why (wider/eval/harness.py has the whole story): lm-eval 0.4.13 finds models only through its registry, which
`lm_eval.models` fills from a fixed table; it has no plugin entry points. `install` writes one line,
`wider_lm_eval.pth`, into the interpreter's site-packages. Python runs that line at start-up (site.py executes
.pth lines that begin with `import`): when a package `wider` is importable, it imports this module FROM THE
INSTALLED PACKAGE (by name, not by a path to some checkout) and puts a finder at the front of sys.meta_path. The
finder does nothing until `lm_eval.models` is imported; then, after that module has run and filled the registry,
it registers "wider" -> "wider.eval.harness:WiderLM" (a lazy entry: nothing of wider or torch is imported until a
run asks for --model wider).

This file uses the standard library only and must stay cheap: it runs at every interpreter start-up of the
environment (importing `wider` and `wider.eval`, whose __init__ files import nothing). If wider is uninstalled,
the .pth line finds no package and does nothing.
"""

import os
import sys

PTH = "wider_lm_eval.pth"
TARGET_MODULE = "lm_eval.models"
# Run by site.py at start-up. find_spec first: without an installed wider the line is a no-op, not an error.
PTH_LINE = ("import importlib.util as _u; _u.find_spec('wider') is not None and "
            "__import__('wider.eval.lm_eval_hook', fromlist=['activate']).activate()\n")


def _register_wider() -> None:
    from lm_eval.api.registry import model_registry

    if "wider" not in model_registry:
        model_registry.register("wider", target="wider.eval.harness:WiderLM")


class _Loader:
    """Runs the real loader of lm_eval.models, then registers wider."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_wider()

    def __getattr__(self, name):  # get_source, is_package, ... for tracebacks and inspect
        return getattr(self._inner, name)


class Finder:
    """A meta-path finder that only wraps the loader of lm_eval.models."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


def activate() -> None:
    """Put the finder in place (once per interpreter)."""
    if not any(type(f).__name__ == "Finder" and getattr(f, "wider", False) for f in sys.meta_path):
        finder = Finder()
        finder.wider = True
        sys.meta_path.insert(0, finder)
    if TARGET_MODULE in sys.modules:  # lm-eval was imported before the hook (an unusual start-up order)
        _register_wider()


def site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install(target_dir: str | None = None) -> str:
    from wider.files import atomic_write_text

    path = os.path.join(target_dir or site_packages(), PTH)
    atomic_write_text(path, PTH_LINE)
    return path


def uninstall(target_dir: str | None = None) -> str:
    path = os.path.join(target_dir or site_packages(), PTH)
    if os.path.exists(path):
        os.remove(path)
    return path


def main(argv: "list[str] | None" = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "status"
    target = argv[1] if len(argv) > 1 else None
    if cmd == "install":
        print(f"[wider] lm_eval hook: {install(target)} (lm_eval --model wider ...)")
    elif cmd == "uninstall":
        print(f"[wider] removed {uninstall(target)}")
    elif cmd == "status":
        path = os.path.join(target or site_packages(), PTH)
        print(f"{path}: {'installed' if os.path.isfile(path) else 'not installed'}")
    else:
        print("usage: python -m wider.eval.lm_eval_hook install|uninstall|status [SITE_DIR]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
