"""The package's modules import one another in one direction only: no cycle, not even one that a
function-local import would hide, and the options can be checked without loading TensorFlow."""
import ast
import os
import subprocess
import sys
import unittest
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PACKAGE = "dermedge_export"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE
MODULES = sorted(p.stem for p in SOURCE.glob("*.py"))
# Their commands parse and check arguments before anything loads TensorFlow.
LIGHT = {"__init__", "__main__", "calibration", "errors", "manifest", "options", "registry"}


def imported_modules(module: str) -> set[str]:
    """The package modules that `module` imports anywhere in its source, function bodies included."""
    tree = ast.parse((SOURCE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == PACKAGE:
                rest = node.module.split(".")[1:]
                found.update(rest[:1] or [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE and len(parts) > 1:
                    found.add(parts[1])
    return found & set(MODULES)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, path = {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def import_first(module: str) -> subprocess.CompletedProcess:
    """A fresh interpreter that imports `module` before any other package module, then all the rest."""
    code = (f"import importlib, sys\n"
            f"importlib.import_module('{PACKAGE}.{module}')\n"
            f"print('tensorflow' in sys.modules)\n"
            f"for m in {MODULES!r}:\n"
            f"    importlib.import_module('{PACKAGE}.' + m)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SOURCE.parent), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


class Imports(unittest.TestCase):
    def test_the_import_graph_has_no_cycle(self):
        graph = {m: imported_modules(m) - {m} for m in MODULES}
        self.assertEqual(find_cycle(graph), None, graph)
        self.assertNotIn("recipes", graph["options"] | graph["manifest"] | graph["errors"])
        self.assertNotIn("export", graph["recipes"])

    def test_the_cycle_finder_finds_a_hidden_cycle(self):
        self.assertEqual(find_cycle({"export": {"recipes"}, "recipes": {"export"}}), ["export", "recipes", "export"])
        self.assertEqual(find_cycle({"export": {"recipes", "options"}, "recipes": {"options"}, "options": set()}), None)

    def test_each_module_imports_first_in_a_fresh_interpreter(self):
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            results = dict(zip(MODULES, pool.map(import_first, MODULES)))
        for module, done in results.items():
            with self.subTest(module=module):
                self.assertEqual(done.returncode, 0, done.stderr[-2000:])
                if module in LIGHT:
                    self.assertEqual(done.stdout.splitlines()[0], "False", f"{module} loads TensorFlow")


if __name__ == "__main__":
    unittest.main()
