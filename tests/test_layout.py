"""The package's layout: nothing importable at the checkout's top level but `fxsketch` (a top-level
package there would shadow a PyPI package of the same name whenever the repository root is on
`sys.path`, as under `python -m pytest`, `python -c` or a notebook started at the root), and the
house rules of its floors: no import cycle, no other module's private name, no import inside a
function (but of optional packages), no module past 600 lines, and a README table naming them all."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxsketch"
# fxsketch modules imported inside a function, each because it imports an optional package
LAZY = {("fxsketch.kernels.ops", "fxsketch.kernels.triton_lowrank")}  # triton: Linux only


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported fxsketch module, imported name or None, inside a function?) for every import of
    `path` outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped, in_function = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [(a.name, None) for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in modules else (base, a.name)
                       for a in node.names]
        for target, imported in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target, imported, id(node) in in_function


def test_no_import_cycles_private_names_or_imports_inside_functions():
    modules = _modules()
    graph, private, lazy = nx.DiGraph(), [], []
    for name, path in modules.items():
        graph.add_node(name)
        for target, imported, inside in _imports(name, path, modules):
            graph.add_edge(name, target)
            if imported and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{name} imports {target}.{imported}")
            if inside and (name, target) not in LAZY:
                lazy.append(f"{name} imports {target} inside a function")
    assert list(nx.simple_cycles(graph)) == []
    assert private == [] and lazy == []


def test_no_module_is_longer_than_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}


def test_the_readme_layout_table_names_every_module_and_folder():
    table = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([^`]+)/` \| (.*) \|$", table, flags=re.M))
    folders = {str(p.parent.relative_to(ROOT)) for p in PACKAGE.rglob("__init__.py")
               if not p.parent.name.startswith("SkAutoTuner")}
    assert folders <= set(rows), sorted(folders - set(rows))
    for folder in ("fxsketch", "fxsketch/search", "fxsketch/kernels"):  # each module of these is named
        named = set(re.findall(r"`(\w+\.py)`", rows[folder]))
        files = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        assert files <= named, (folder, sorted(files - named))


def test_nothing_importable_at_the_top_level_but_fxsketch():
    importable = sorted(p.name for p in ROOT.iterdir()
                        if (p.is_dir() and (p / "__init__.py").exists()) or (p.is_file() and p.suffix == ".py"))
    assert importable == ["fxsketch"]


def test_a_transformers_model_builds_and_runs_with_the_repo_root_first_on_sys_path():
    pytest.importorskip("transformers")
    pytest.importorskip("kernels")  # the PyPI package transformers imports; the op family is fxsketch.kernels
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import kernels, torch, transformers
        from pathlib import Path
        assert Path(kernels.__file__).resolve().parent.parent != Path({str(ROOT)!r}), kernels.__file__
        cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16)
        model = transformers.BertModel(cfg).eval()
        import fxsketch
        with torch.no_grad():
            out = model(torch.randint(0, 64, (2, 8))).last_hidden_state
        assert out.shape == (2, 8, 16)
        assert fxsketch.kernels.__name__ == "fxsketch.kernels"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_importing_fxsketch_loads_neither_optuna_nor_pandas_until_a_search_is_asked_for():
    script = textwrap.dedent("""
        import sys
        import fxsketch
        assert "optuna" not in sys.modules and "pandas" not in sys.modules, "eager"
        fxsketch.capture, fxsketch.LayerConfig, fxsketch.load  # the rest of the API is there at once
        assert "optuna" not in sys.modules and "pandas" not in sys.modules, "capture"
        assert callable(fxsketch.optimize) and fxsketch.Result.__name__ == "Result"
        assert "optuna" in sys.modules and "pandas" in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
