"""The house as README's layout draws it: common/ (shared training code) imports nothing from eval/,
and no module of common/ or eval/ imports itself back through others (imports inside functions included)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path):
    """The common.* and eval.* modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("common", "eval"):
            if "." in node.module:
                found.add(node.module)
            else:  # from common import data, utils
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in ("common", "eval")}
    return found


# A module importing its own name (eval.study does, when run as a script, so that SLURM jobs' pickles
# name eval.study's classes) is not a cycle through others.
GRAPH = {module: imports(p) - {module} for folder in ("common", "eval") for p in (ROOT / folder).glob("*.py")
         if p.stem != "__init__" for module in [f"{folder}.{p.stem}"]}


def test_common_imports_nothing_from_eval():
    assert {m: sorted(d for d in deps if d.startswith("eval.")) for m, deps in GRAPH.items()
            if m.startswith("common.") and any(d.startswith("eval.") for d in deps)} == {}


def test_no_import_cycles():
    def reaches(start, target, seen):
        for dep in GRAPH.get(start, ()):
            if dep == target:
                return True
            if dep not in seen:
                seen.add(dep)
                if reaches(dep, target, seen):
                    return True
        return False

    assert [m for m in GRAPH if reaches(m, m, set())] == []
