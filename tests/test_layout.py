"""The evaluation side of the package imports one way: the CLI (eval.py) above the two evaluations
(eval_v1.py, eval_v2.py), both above the embedding engine (embedding.py) and the collectives
(distributed.py); the media readers (media.py) below both the data package and the evaluations."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vlm2vec"
EVAL_SIDE = ("vlm2vec.eval", "vlm2vec.eval_v1", "vlm2vec.eval_v2", "vlm2vec.embedding", "vlm2vec.distributed",
             "vlm2vec.train_eval", "vlm2vec.media", "vlm2vec.errors", "vlm2vec.data")  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (function-local and TYPE_CHECKING
    imports included: a cycle through them is still a cycle of the design)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_evaluation_modules_are_in_no_import_cycle():
    graph = import_graph()
    assert "vlm2vec.eval_v2" in graph["vlm2vec.eval"]  # the CLI dispatches to both evaluations
    bad = [sorted(c) for c in cycles(graph) if any(m.startswith(EVAL_SIDE) for m in c)]
    assert bad == []


def test_lower_modules_import_without_the_upper_ones():
    """In a fresh interpreter: the media readers load without the data package, the evaluations and
    the engine without the CLI."""
    code = (
        "import sys\n"
        "import vlm2vec.media\n"
        "assert callable(vlm2vec.media.load_image)\n"
        "assert not any(m.startswith('vlm2vec.data') for m in sys.modules), 'media loaded vlm2vec.data'\n"
        "import vlm2vec.embedding, vlm2vec.eval_v1, vlm2vec.eval_v2, vlm2vec.train_eval\n"
        "assert 'vlm2vec.eval' not in sys.modules, 'an evaluation loaded the CLI'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_whole_package_is_in_no_import_cycle():
    """Issue 21: 0 import cycles anywhere in vlm2vec (there were three)."""
    assert cycles(import_graph()) == []


def test_no_module_over_600_lines():
    """One job per module: no Python file of the trainer or the loss package grows past 600 lines."""
    files = [*PACKAGE.rglob("*.py"), *(REPO / "kernels" / "vlm2vec_kernels").rglob("*.py")]
    long = {
        str(p.relative_to(REPO)): n
        for p in files
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert long == {}
