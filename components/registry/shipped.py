"""The seedlm modules a registered model carries, so that its pyfunc generates with the one engine
(components/serving/engine.py) without this repo: MLflow "models from code" `code_paths`.

`stage(dst)` copies the engine and every `components.*` module it imports, found by reading their import
statements (function-level imports included), into `dst/<CODE_DIR>/components/...`. MLflow copies that
folder into the model's `code/` folder; the pyfunc imports the engine from there under its own names
(registry/pyfunc.py `import_shipped`), never mixing it with a `components` package the loading process has.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds the `components` package."""
ENGINE = "components.serving.engine"
RAG = "components.serving.rag"
STARTS = (ENGINE, RAG)
"""The modules the pyfunc imports: the engine and retrieval-augmented prompts."""
PACKAGE = "components"
CODE_DIR = "seedlm_engine_src"
"""The folder `code_paths` ships (a name no installed package uses); registry/pyfunc.py has the same constant."""


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module or package `name` under `root`; None if it is not there."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(path: Path, name: str, root: Path) -> set[str]:
    """The `components.*` modules that the module `name` at `path` imports, anywhere in its body."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if module_file(f"{base}.{a.name}", root))
    return {m for m in found if m.startswith(PACKAGE + ".") and module_file(m, root)}


def closure(start: str | tuple[str, ...] = STARTS, root: Path = ROOT) -> list[str]:
    """`start` and every `components.*` module it needs, with the packages (`__init__`) on their way."""
    todo, seen = [start] if isinstance(start, str) else list(start), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = module_file(name, root)
        if path is None:
            raise FileNotFoundError(f"{name}: no such module under {root}")
        seen.add(name)
        parents = [".".join(name.split(".")[:i]) for i in range(2, name.count(".") + 1)]
        todo.extend(p for p in parents if module_file(p, root))
        todo.extend(_imported(path, name, root))
    return sorted(seen)


def stage(dst: Path, start: str | tuple[str, ...] = STARTS, root: Path = ROOT) -> Path:
    """Copy the modules `start` needs into `dst/CODE_DIR` (laid out as in the repo); returns that folder."""
    out = Path(dst) / CODE_DIR
    for name in closure(start, root):
        src = module_file(name, root)
        target = out / src.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return out
