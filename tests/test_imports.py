"""The import rules of docs/DESIGN.md, read from the source: every import of a ``fl_covid`` module stands at the top
of its module (none inside a function or behind a condition), the modules import each other without a cycle, and
the library below ``fl_covid/experiments/`` imports neither Flower (records.py excepted) nor clients/ or server/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fl_covid"


def _module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Every module name an import statement may load: ``from a import b`` may load ``a`` and ``a.b``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """Module -> (imported name, whether the import is a statement of the module's top level), for every import."""
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(file)
        tree = ast.parse(file.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        out[module] = [(name, id(node) in top) for node in ast.walk(tree)
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       for name in _imported(node, module, file.name == "__init__.py")]
    return out


def test_every_import_of_the_package_is_at_the_top_of_its_module() -> None:
    imports = _imports()
    late = [(module, name) for module, names in imports.items() for name, at_top in names
            if not at_top and name.split(".")[0] == "fl_covid"]
    assert not late, f"imports inside a function or a condition: {late}"


def test_the_modules_import_each_other_without_a_cycle() -> None:
    imports = _imports()
    edges = {module: {name for name, _ in names if name in imports and name != module}
             for module, names in imports.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        for target in sorted(edges[module]):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(edges):
        visit(module, [])


def test_the_library_imports_neither_flower_nor_the_apps() -> None:
    imports = _imports()
    for module, names in imports.items():
        if module.startswith("fl_covid.experiments"):
            continue  # above both the library and the apps
        roots = {name.split(".")[0] for name, _ in names}
        assert not roots & {"clients", "server"}, f"{module} imports clients/ or server/"
        if module != "fl_covid.records":
            assert "flwr" not in roots, f"{module} imports Flower (only fl_covid.records may)"
