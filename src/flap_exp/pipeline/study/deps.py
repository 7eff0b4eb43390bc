"""The library files a stage script runs: the transitive closure of its flap_exp imports (static, by ast),
fingerprinted for DVC.

A stage depends on the fingerprint of its script's closure, `results/code/SCRIPT.txt` (the sha256 of every file
it runs), which the `code` stage writes; so an edit to, say, arch.py reruns exactly the stages that import it,
and dvc.lock records one code dependency per stage instead of the ~50 files it listed (the lock was 1.4 MB and
DVC reads and rewrites it after every stage). Imports inside functions count (the library imports lazily), and
so does a registry's package: `Registry(axis, "flap_exp.methods.X")` imports every module of that package on
first use (registry.py), so a file that declares one depends on all of their files (names, options, checks);
the code a method module imports to run (lazily, in its `begin`) counts only in a per-method fingerprint,
`results/code/SCRIPT-METHOD.txt` (for a script that takes `--compensation`), whose closure follows that one
method module like an import: a cell that runs one compensation method reruns when that method's code
changes, and no other stage does. A user's FLAP_EXP_PLUGINS modules live outside the repository, untracked.
In dvc.yaml each stage's code dependency sits between `# imports of stages/X.py: BEGIN` (`... [method]: BEGIN`
for the per-method one) and `# END`; `python -m flap_exp.pipeline.study.deps --write dvc.yaml` regenerates them,
`--fingerprints results/code` is the code stage, and tests/test_dvc_graph.py fails when dvc.yaml disagrees.
`python -m flap_exp.pipeline.study.deps stages/X.py` prints one closure.
"""
from __future__ import annotations

import ast
import hashlib
import re
import sys
from pathlib import Path

from ...atomic import atomic_file

BLOCK = re.compile(r"^(?P<indent>[ ]*)# imports of (?P<script>\S+?)(?P<method> \[method\])?: BEGIN\n"
                   r"(?:(?P=indent)- .*\n)*?(?P=indent)# END\n", re.M)

PACKAGE = "flap_exp"
CODE = "results/code"  # the code stage's output: one fingerprint per stage script (and per method)
METHODS = "flap_exp.methods.compensation"  # the registry package a per-method fingerprint narrows


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


def _imports(src: Path, f: Path, select: dict[str, str] | None = None) -> tuple[set[str], set[str]]:
    """Modules of the package that file `f` imports (absolute or relative, at any depth in the file), and the
    modules a registry in it registers: their files count, the code they call only when `select` names one
    ({package: method}; that one is followed like an import)."""
    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
    here = _module_of(src, f) if f.is_relative_to(src) else ""
    pkg = here if f.name == "__init__.py" else here.rpartition(".")[0]
    out: set[str] = set()
    registered: set[str] = set()
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
            package = _registry_package(node)
            chosen = (select or {}).get(package)
            out |= {package, f"{package}.{chosen}"} if chosen else {package}
            registered |= _package_modules(src, package)
    ours = lambda ms: {m for m in ms if m == PACKAGE or m.startswith(PACKAGE + ".")}  # noqa: E731
    return ours(out), ours(registered) - ours(out)


def closure(script: str | Path, src: str | Path = "src", select: dict[str, str] | None = None) -> list[str]:
    """Sorted repo-relative paths of every flap_exp file `script` runs, with the packages' __init__ files
    (`select`: {registry package: the one method module counted of it})."""
    src = Path(src)
    todo, seen = [Path(script)], set()
    files: set[Path] = set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        imported, registered = _imports(src, f, select)
        for mod in imported:
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                mf = _module_file(src, ".".join(parts[:i]))
                if mf is not None:
                    files.add(mf)
                    todo.append(mf)
        # a registered method module: its file (names, options, checks), not what it imports to run
        files |= {mf for mf in (_module_file(src, m) for m in registered) if mf is not None}
    return sorted(str(p) for p in files)


def methods(src: str | Path = "src") -> list[str]:
    """The compensation methods (the modules of METHODS), each with its own fingerprint per script."""
    folder = Path(src).joinpath(*METHODS.split("."))
    return sorted(f.stem for f in folder.glob("*.py") if f.name != "__init__.py")


def fingerprint(script: str | Path, root: str | Path = ".", method: str | None = None) -> str:
    """`sha256  path` of the script and every library file it runs (with one compensation method's module, if
    given): the content of results/code/SCRIPT[-METHOD].txt."""
    root = Path(root)
    select = {METHODS: method} if method else None
    files = [Path(script)] + [Path(f) for f in closure(root / script, root / "src", select)]
    lines = []
    for f in files:
        path = f if f.is_absolute() else root / f
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}\n")
    return "".join(lines)


def write_fingerprints(out: str | Path = CODE, root: str | Path = ".") -> list[str]:
    """The code stage: one fingerprint per stage script, plus one per method for a script whose closure holds
    the methods' registry; files whose content is unchanged are not rewritten. Returns the names written."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, str] = {}
    for script in sorted((root / "stages").glob("*.py")):
        rel = script.relative_to(root)
        wanted[f"{script.stem}.txt"] = text = fingerprint(rel, root)
        if "--compensation" in script.read_text(encoding="utf-8"):  # a cell's stage: it runs one method
            wanted |= {f"{script.stem}-{m}.txt": fingerprint(rel, root, m) for m in methods(root / "src")}
    written = []
    for name, text in wanted.items():
        target = out / name
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            with atomic_file(target) as tmp:
                tmp.write_text(text, encoding="utf-8")
            written.append(name)
    for stale in set(p.name for p in out.glob("*.txt")) - set(wanted):  # a deleted stage script
        (out / stale).unlink()
    return written


def regenerate(dvc_yaml_text: str, root: str | Path = ".") -> str:
    """dvc.yaml's text with every `# imports of SCRIPT: BEGIN ... # END` block naming SCRIPT's fingerprint
    (`${item.method}`'s for a `[method]` block)."""

    def block(m: re.Match) -> str:
        ind, script, per_method = m["indent"], m["script"], bool(m["method"])
        name = Path(script).stem + ("-${item.method}" if per_method else "")
        return (f"{ind}# imports of {script}{' [method]' if per_method else ''}: BEGIN\n"
                f"{ind}- {CODE}/{name}.txt\n{ind}# END\n")
    return BLOCK.sub(block, dvc_yaml_text)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args[:1] == ["--fingerprints"]:
        out = args[1] if len(args) > 1 else CODE
        written = write_fingerprints(out)
        print(f"code: {len(written)} fingerprint(s) changed in {out}" + (f": {', '.join(written)}" if written else ""))
        return 0
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
