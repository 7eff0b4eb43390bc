"""The library files a stage script runs: the transitive closure of its flap_exp imports (static, by ast).

dvc.yaml lists them as each stage's `deps` so that an edit to, say, arch.py reruns exactly the stages that
import it. Imports inside functions count (the library imports lazily), and so does a registry's package:
`Registry(axis, "flap_exp.methods.X")` imports every module of that package on first use (registry.py), so a
file that declares one depends on all of them (a user's FLAP_EXP_PLUGINS modules live outside the repository
and are not tracked). In dvc.yaml each stage's code
dependencies sit between `# imports of stages/X.py: BEGIN` and `# END`;
`python -m flap_exp.pipeline.deps --write dvc.yaml` regenerates them, and tests/test_dvc_graph.py fails
when dvc.yaml disagrees with the import graph. `python -m flap_exp.pipeline.deps stages/X.py` prints one.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"^(?P<indent>[ ]*)# imports of (?P<script>\S+): BEGIN\n(?:(?P=indent)- .*\n)*?(?P=indent)# END\n",
                   re.M)

PACKAGE = "flap_exp"


def _module_file(src: Path, module: str) -> Path | None:
    base = src.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_of(src: Path, f: Path) -> str:
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _registry_package(call: ast.Call) -> str:
    """"flap_exp.methods.X" for a call `Registry(axis, "flap_exp.methods.X", ...)`, else ""."""
    name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
    arg = call.args[1] if name == "Registry" and len(call.args) > 1 else None
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""


def _package_modules(src: Path, package: str) -> set[str]:
    """The package and every module directly in it (what Registry._load imports)."""
    folder = src.joinpath(*package.split("."))
    return {package} | {f"{package}.{f.stem}" for f in folder.glob("*.py") if f.name != "__init__.py"}


def _imports(src: Path, f: Path) -> set[str]:
    """Modules of the package that file `f` imports (absolute or relative, at any depth in the file)."""
    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
    here = _module_of(src, f) if f.is_relative_to(src) else ""
    pkg = here if f.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if pkg else []
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from pkg import submodule`
        elif isinstance(node, ast.Call) and _registry_package(node):
            out |= _package_modules(src, _registry_package(node))
    return {m for m in out if m == PACKAGE or m.startswith(PACKAGE + ".")}


def closure(script: str | Path, src: str | Path = "src") -> list[str]:
    """Sorted repo-relative paths of every flap_exp file `script` runs, with the packages' __init__ files."""
    src = Path(src)
    todo, seen = [Path(script)], set()
    files: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for mod in _imports(src, f):
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                mf = _module_file(src, ".".join(parts[:i]))
                if mf is not None:
                    files.add(mf)
                    todo.append(mf)
    return sorted(str(p) for p in files)


def regenerate(dvc_yaml_text: str, root: str | Path = ".") -> str:
    """dvc.yaml's text with every `# imports of SCRIPT: BEGIN ... # END` block rewritten from the imports."""
    root = Path(root)

    def block(m: re.Match) -> str:
        ind, script = m["indent"], m["script"]
        files = [script] + [str(Path(f).relative_to(root)) for f in closure(root / script, root / "src")]
        return (f"{ind}# imports of {script}: BEGIN\n" + "".join(f"{ind}- {f}\n" for f in files) + f"{ind}# END\n")
    return BLOCK.sub(block, dvc_yaml_text)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--write"]:
        path = Path(args[1] if len(args) > 1 else "dvc.yaml")
        text = path.read_text(encoding="utf-8")
        new = regenerate(text, path.parent)
        if new != text:
            path.write_text(new, encoding="utf-8")
        print(f"deps: {path} {'updated' if new != text else 'already agrees with the import graph'}")
        return 0
    for script in args:
        print(f"{script}:")
        for f in closure(script):
            print(f"  - {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
