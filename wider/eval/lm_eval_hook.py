"""Make `lm_eval --model wider ...` work in a virtual environment: an import hook installed by a .pth file.

    python wider/eval/lm_eval_hook.py install      # ./run.sh's set-up does this for .venv
    python wider/eval/lm_eval_hook.py uninstall
    python wider/eval/lm_eval_hook.py status

Why (wider/eval/harness.py has the whole story): lm-eval 0.4.13 finds models only through its registry, which
`lm_eval.models` fills from a fixed table; it has no plugin entry points. `install` writes one line,
`wider_lm_eval.pth`, into the interpreter's site-packages. Python runs that line at start-up (site.py executes
.pth lines that begin with `import`); it loads THIS file from the repository and puts a finder at the front of
sys.meta_path. The finder does nothing until `lm_eval.models` is imported; then, after that module has run and
filled the registry, it registers "wider" -> "wider.eval.harness:WiderLM" (a lazy entry: nothing of wider
or torch is imported until a run asks for --model wider) and appends the repository root to sys.path so that
`wider` and `patches` import.

This file uses the standard library only and must stay cheap: it runs at every interpreter start-up of the
environment. If the repository moves, the .pth line finds no file and does nothing (rerun `install`).
"""

import os
import sys

MODULE = "_wider_lm_eval_hook"
PTH = "wider_lm_eval.pth"
TARGET_MODULE = "lm_eval.models"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _register_wider() -> None:
    if REPO not in sys.path:
        sys.path.append(REPO)
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


def pth_line(hook_file: str) -> str:
    """The .pth line: if this file still exists, run it as module _wider_lm_eval_hook, then activate(). Plain
    exec of the source (no importlib.util, which would cost a few milliseconds at every start-up)."""
    return (f"import os, sys; _p = {hook_file!r}; "
            f"_m = os.path.isfile(_p) and sys.modules.setdefault({MODULE!r}, type(sys)({MODULE!r})); "
            f"_m and (_m.__dict__.update(__file__=_p), exec(compile(open(_p).read(), _p, 'exec'), _m.__dict__), "
            f"_m.activate())\n")


def site_packages() -> str:
    import sysconfig

    return sysconfig.get_paths()["purelib"]


def install(target_dir: str | None = None) -> str:
    d = target_dir or site_packages()
    path = os.path.join(d, PTH)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(pth_line(os.path.abspath(__file__)))
    os.replace(tmp, path)
    return path


def uninstall(target_dir: str | None = None) -> str:
    path = os.path.join(target_dir or site_packages(), PTH)
    if os.path.exists(path):
        os.remove(path)
    return path


def main(argv: list[str]) -> int:
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
        print(f"usage: python {os.path.relpath(__file__)} install|uninstall|status [SITE_DIR]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
