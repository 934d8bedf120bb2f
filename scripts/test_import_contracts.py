"""The project's import-linter contracts (tools/import_contracts.py) on small made-up trees, and on this one."""

import subprocess
import sys
from pathlib import Path

import grimp
import pytest
from importlinter import ContractCheck

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.import_contracts import EntryPointsContract, imported_modules, is_test_module, without_tests  # noqa: E402

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def test_imports_of_the_package_are_found_whatever_their_form(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text("import os\nimport pkg.a\nfrom pkg import b, c\nfrom pkg.d.e import name\n"
                      "def f():\n    from pkg.lazy import x\nfrom .rel import y\nimport pkgother\n")
    assert imported_modules(script, "pkg") == [(2, "pkg.a"), (3, "pkg.b"), (3, "pkg.c"), (4, "pkg.d.e.name"),
                                               (6, "pkg.lazy.x")]


def test_test_modules_are_left_out_of_the_graph():
    assert is_test_module("pkg.sub.test_x") and is_test_module("pkg.conftest") and not is_test_module("pkg.testing")
    graph = grimp.ImportGraph()
    for name in ("pkg", "pkg.low", "pkg.high", "pkg.low.test_low"):
        graph.add_module(name)
    graph.add_import(importer="pkg.low.test_low", imported="pkg.high")
    assert without_tests(graph).modules == {"pkg", "pkg.low", "pkg.high"}


def test_a_script_importing_an_internal_module_breaks_the_entry_points_contract(tmp_path):
    (tmp_path / "good.py").write_text("from improved_diffusion import cli\nfrom improved_diffusion.sampling.run "
                                      "import sample_dataset\n")
    (tmp_path / "test_anything.py").write_text("from improved_diffusion.sampling.sampler import sample_video\n")
    graph = grimp.build_graph("improved_diffusion")

    def check():
        contract = EntryPointsContract(name="t", session_options={}, contract_options={
            "scripts": str(tmp_path), "entry_points": ["improved_diffusion.cli", "improved_diffusion.sampling.run"]})
        return contract.check(graph, verbose=False)

    assert check().kept  # test files may import anything
    (tmp_path / "bad.py").write_text("import sys\nfrom improved_diffusion.sampling.sampler import sample_video\n")
    result = check()
    assert isinstance(result, ContractCheck) and not result.kept
    assert result.metadata["broken"] == [f"{tmp_path / 'bad.py'}:2 imports improved_diffusion.sampling.sampler, "
                                         "which is not a public entry point"]


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="lint-imports is not installed beside this Python")
def test_this_tree_keeps_every_contract():
    result = subprocess.run([str(LINT_IMPORTS)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "3 kept, 0 broken" in result.stdout
