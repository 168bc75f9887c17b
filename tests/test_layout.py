"""kfdeb's layout: one concern per module, the leaves below everything else, no import cycle, one sitting each."""

from __future__ import annotations

import ast
from pathlib import Path

KFDEB = Path(__file__).resolve().parents[1] / "kfdeb"
GROUND = {"errors", "files"}  # every module may import these; they import nothing of kfdeb but each other
LEAVES = {"pooling", "losses", "metrics", "optim", "distributed", "readers", "batching", "search", "gradcache",
          "deberta", "onnx_quantize", "ir_data", "ir_metrics", "encoding", "cpu_linear", "decoding",
          "inference_dtype", "amp"}  # the components: they import only the ground and one another
LONGEST = 400  # lines: "each readable top to bottom in one sitting"


def kfdeb_imports(path: Path) -> set[str]:
    """The kfdeb modules `path` imports, anywhere in it, except under `if TYPE_CHECKING:` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for guard in ast.walk(tree) if isinstance(guard, ast.If)
               and isinstance(guard.test, ast.Name) and guard.test.id == "TYPE_CHECKING"
               for node in ast.walk(guard)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kfdeb":
            found |= {a.name for a in node.names} if node.module == "kfdeb" else {node.module.split(".")[1]}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kfdeb.")}
    return found - {path.stem}


GRAPH = {path.stem: kfdeb_imports(path) for path in sorted(KFDEB.glob("*.py"))}


def test_the_leaves_import_nothing_above_them():
    for leaf in sorted(LEAVES):
        above = GRAPH[leaf] - GROUND - LEAVES
        assert not above, f"{leaf} imports {sorted(above)}"
    for ground in sorted(GROUND):
        assert GRAPH[ground] <= GROUND, f"{ground} imports {sorted(GRAPH[ground] - GROUND)}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for dependency in sorted(GRAPH.get(module, ())):
            visit(dependency, trail + [module])
        state[module] = "done"

    for module in GRAPH:
        visit(module, [])


def test_every_module_reads_in_one_sitting_and_the_readme_lists_it():
    readme = (KFDEB.parent / "README.md").read_text(encoding="utf-8")
    for path in sorted(KFDEB.glob("*.py")):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= LONGEST, f"{path.name}: {lines} lines"
        if path.stem != "__init__":
            assert f"`kfdeb/{path.name}`" in readme, f"README's module table lacks kfdeb/{path.name}"
