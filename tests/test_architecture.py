"""The package's shape, checked: subpackages depend one way (docs/design.md §6),
no module imports another's private name, no import cycle between modules.

Every `import` in `src/casa` counts, including those inside functions (a lazy
import is still a dependency)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "casa"

# Lower layers never import higher ones. Same-rank units may not import each other
# unless listed in SIDEWAYS.
LAYERS = {
    "config": 0, "files": 0, "threads": 0, "weights": 0, "workers": 0,
    "vision": 1,
    "core": 2,
    "data": 3,
    "pretrained": 4,
    "inference": 5,
    "eval": 6, "hub": 6,
    "training": 7,
    "bench": 8,
    "study": 9, "serve": 9,
    "cli": 10,
}
SIDEWAYS = {("files", "config"), ("weights", "files")}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in a file."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("casa")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("casa"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; casa uses absolute imports")
    return out


def unit(module: str) -> str:
    """casa.core.model -> core; casa.config -> config; casa -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


# Files copied verbatim into a transformers export (`casa export`): not casa modules, they run where casa is not
# installed, and transformers' remote code imports them from each other with relative imports.
REMOTE = SRC / "hub" / "remote"


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py") if REMOTE not in p.parents}


def test_remote_code_imports_no_casa():
    bad = [f"{p.name}: imports {target}" for p in REMOTE.glob("*.py") for target, _, _ in imports_any(p)
           if target.startswith("casa")]
    assert not bad, "the exported modeling files must run without casa:\n" + "\n".join(bad)


def imports_any(path: Path) -> list[tuple[str, list[str], int]]:
    """Every absolute import of a file (relative ones allowed), as `imports` lists them."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node.module or "", [a.name for a in node.names], node.lineno))
    return out


def test_every_unit_has_a_layer():
    units = {unit(m) for m in all_modules()} - {"", "__main__"}
    assert units <= set(LAYERS), f"add {sorted(units - set(LAYERS))} to LAYERS (and to docs/design.md §6)"


def test_dependencies_point_one_way():
    bad = []
    for mod, path in all_modules().items():
        src = unit(mod)
        if not src:
            continue  # casa/__init__.py re-exports the public API lazily
        for target, _, line in imports(path):
            dst = unit(target)
            if not dst or dst == src or (src, dst) in SIDEWAYS:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(SRC)}:{line}: {src} imports {target} ({dst} is not below {src})")
    assert not bad, "\n".join(bad)


def test_no_private_name_crosses_a_module():
    bad = []
    for mod, path in all_modules().items():
        for target, names, line in imports(path):
            if target == mod:
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(part.startswith("_") and part != "__init__" for part in target.split(".")):
                bad.append(f"{path.relative_to(SRC)}:{line}: imports {target} {private}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    modules = all_modules()
    graph = {m: {t for t, names, _ in imports(p)} | {f"{t}.{n}" for t, names, _ in imports(p) for n in names}
             for m, p in modules.items()}
    graph = {m: {t for t in deps if t in modules and t != m} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t == "casa" or m == "casa":
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_modules_stay_readable():
    sources = [*SRC.rglob("*.py"), *SRC.rglob("*.c")]  # the C kernels too
    long = {str(p.relative_to(SRC)): n for p in sources if (n := len(p.read_text().splitlines())) > 650}
    assert not long, f"split these modules (one concept per module, ~600 lines at most): {long}"


def test_no_citation_of_a_file_outside_the_repository():
    root = SRC.parents[1]
    texts = [*SRC.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "docs").glob("*.md"), root / "README.md"]
    needle = "DESIGN" + ".md"  # the planning document lives outside the repository
    bad = [str(p.relative_to(root)) for p in texts if needle in p.read_text()]
    assert not bad, f"cite docs/design.md instead in {bad}"
