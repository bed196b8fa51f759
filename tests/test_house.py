"""House rules checked on the source: no function over 60 lines of code, no import of another module's private
name, and one labelling path (the engines and compare call pipeline.label_batch)."""

from __future__ import annotations

import ast
from pathlib import Path

import segfromxai

PACKAGE = Path(segfromxai.__file__).parent
MAX_CODE_LINES = 60


def _modules() -> list[tuple[Path, ast.Module, list[str]]]:
    out = []
    for p in sorted(PACKAGE.rglob("*.py")):
        text = p.read_text()
        out.append((p, ast.parse(text), text.splitlines()))
    return out


def _code_lines(fn: ast.FunctionDef, lines: list[str]) -> int:
    """Lines of a function that hold code: its docstring, blank lines and comment lines left out."""
    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
        and isinstance(body[0].value.value, str)
    if has_doc and len(body) == 1:
        return 1
    first = body[1].lineno if has_doc else body[0].lineno
    text = lines[fn.lineno - 1:first - 1] if not has_doc else lines[fn.lineno - 1:body[0].lineno - 1]
    head = [s for s in text if s.strip() and not s.strip().startswith("#")]
    code = [s for s in lines[first - 1:fn.end_lineno] if s.strip() and not s.strip().startswith("#")]
    return len(head) + len(code)


def test_no_function_over_60_lines_of_code():
    long = [f"{p.relative_to(PACKAGE)}:{fn.name} ({n})" for p, tree, lines in _modules()
            for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
            if (n := _code_lines(fn, lines)) > MAX_CODE_LINES]
    assert not long, f"functions over {MAX_CODE_LINES} lines of code: {', '.join(long)}"


def test_code_line_count_known_answer():
    src = 'def f(a):\n    """Doc.\n\n    More.\n    """\n    # note\n    x = a\n\n    return x\n'
    fn = ast.parse(src).body[0]
    assert _code_lines(fn, src.splitlines()) == 3  # def line, x = a, return x


def test_no_module_imports_another_modules_private_name():
    bad = []
    for p, tree, _ in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                parts = (node.module or "").split(".")
                private_module = any(part.startswith("_") and not part.startswith("__") for part in parts)
                if names or private_module:
                    bad.append(f"{p.relative_to(PACKAGE)}: from {'.' * node.level}{node.module} import "
                               f"{', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in {"masks", "coco", "refine", "fusion",
                                                                         "pipeline", "engine", "faithfulness"}:
                    bad.append(f"{p.relative_to(PACKAGE)}: {node.value.id}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_engines_and_compare_label_through_one_function():
    def called(name: str) -> set[str]:
        tree = ast.parse((PACKAGE / name).read_text())
        return {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}

    assert "label_batch" in called("run/local.py")
    assert called("quality/compare.py") & {"label_batch", "label_items"}  # label_items is run/local's, over label_batch
    ray = (PACKAGE / "run" / "ray.py").read_text()
    assert "process_chunk" in ray and "label_image" not in ray and "explain" not in ray.replace("explained", "")
