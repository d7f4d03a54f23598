"""The package's layers import one way: core -> data -> models -> inference -> variance ->
analysis -> experiments -> bench -> cli. Each subpackage imports on its own, and every import
sits at the top of its module (the CLI may defer heavy imports for start-up time)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bayes_router"
LAYERS = ("core", "data", "models", "inference", "variance", "analysis", "experiments", "bench",
          "cli", "__main__")
MAY_DEFER_IMPORTS = {"cli.py"}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "bayes_router" and len(parts) > 1 else None


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        yield relative, relative.parts[0].removesuffix(".py"), ast.parse(path.read_text())


def imported(node) -> list[str]:
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module and node.level == 0 else []
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def test_every_module_belongs_to_a_layer():
    for relative, layer, _ in modules():
        assert relative.name == "__init__.py" or layer in LAYERS, relative


def upward_imports(relative, layer: str, tree) -> list[str]:
    """Imports of ``tree`` (a module of ``layer``) from a layer above it."""
    found = []
    for node in ast.walk(tree):
        for name in imported(node):
            target = layer_of(name)
            if target in LAYERS and LAYERS.index(target) > LAYERS.index(layer):
                found.append(f"{relative}:{node.lineno} imports {name}")
    return found


def test_no_module_imports_from_a_layer_above_it():
    upward = [line for relative, layer, tree in modules() if layer in LAYERS
              for line in upward_imports(relative, layer, tree)]
    assert not upward, "\n".join(upward)


def test_imports_sit_at_the_top_of_their_module():
    deferred = []
    for relative, _, tree in modules():
        if str(relative) in MAY_DEFER_IMPORTS:
            continue
        top = {id(node) for node in tree.body}
        for node in tree.body:  # an optional dependency: `try: import x` at module level
            if isinstance(node, ast.Try):
                top |= {id(n) for n in node.body}
        deferred += [f"{relative}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top]
    assert not deferred, "function-local imports: " + ", ".join(deferred)


def test_the_layer_rule_sees_an_upward_import():
    """The rule above can fail: an upward import (also one inside a function) is reported, a
    downward one is not."""
    tree = ast.parse("from bayes_router.core import routing\n"
                     "def f():\n    from bayes_router.inference.train import train\n")
    assert upward_imports("m.py", "models", tree) == [
        "m.py:3 imports bayes_router.inference.train"]
    assert upward_imports("m.py", "experiments", tree) == []


@pytest.mark.parametrize("layer", [layer for layer in LAYERS if layer != "__main__"])
def test_each_subpackage_imports_on_its_own(layer):
    """A fresh interpreter per subpackage: no hidden import-order dependency or cycle."""
    result = subprocess.run([sys.executable, "-c", f"import bayes_router.{layer}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
