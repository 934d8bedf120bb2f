"""The project's own import-linter contract types (`.importlinter` names them; `lint-imports` runs them).

- `layers_without_tests`, `acyclic_siblings_without_tests`: import-linter's layers and acyclic-siblings
  contracts on the package without its test modules (test_*.py, conftest.py), which may reach across
  layers to check one piece against another; import-linter's ignore_imports cannot match them by name.
- `entry_points`: every command-line script in a folder imports from the package only the modules
  listed as its public entry points, so the scripts stay thin and internals can move freely.
"""

import ast
from pathlib import Path

from importlinter import Contract, ContractCheck, fields, output
from importlinter.contracts.acyclic_siblings import AcyclicSiblingsContract
from importlinter.contracts.layers import LayersContract


def is_test_module(name):
    last = name.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def without_tests(graph):
    """The graph (a contract's own copy) with every test module removed."""
    for module in [m for m in graph.modules if is_test_module(m)]:
        graph.remove_module(module)
    return graph


class LayersWithoutTestsContract(LayersContract):
    type_name = "layers_without_tests"

    def check(self, graph, verbose):
        return super().check(without_tests(graph), verbose)


class AcyclicSiblingsWithoutTestsContract(AcyclicSiblingsContract):
    type_name = "acyclic_siblings_without_tests"

    def check(self, graph, verbose):
        return super().check(without_tests(graph), verbose)


def imported_modules(path, package):
    """[(line, module)] of every import of `package` or its modules in the Python file `path`.

    `from package import name` counts as an import of package.name when that is a module, else of package.
    """
    found = []
    for node in ast.walk(ast.parse(Path(path).read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names
                      if alias.name.split(".")[0] == package]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == package:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


class EntryPointsContract(Contract):
    """Scripts (the non-test .py files of `scripts`) import only `entry_points` of the package."""

    type_name = "entry_points"
    scripts = fields.StringField()
    entry_points = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose):
        package = self.entry_points[0].split(".")[0]
        allowed = set(self.entry_points)
        broken = []
        for path in sorted(Path(self.scripts).glob("*.py")):
            if is_test_module(path.stem):
                continue
            for line, module in imported_modules(path, package):
                if module not in graph.modules:  # "from package.mod import name": the module is mod
                    module = module.rsplit(".", 1)[0]
                if module not in allowed:
                    broken.append(f"{path}:{line} imports {module}, which is not a public entry point")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check):
        for line in check.metadata["broken"]:
            output.print_error(line, bold=False)
        output.new_line()
