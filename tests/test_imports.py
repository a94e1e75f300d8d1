"""The library's import graph: acyclic, no project import hidden inside a function, and imports go down the chapter
order except for a short, named list of leaf modules (printed by `python tests/test_imports.py`)."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIB = REPO / "dino_from_scratch"
NBS = REPO / "nbs"

# module -> chapter notebook (the `#| default_exp` of each notebook), giving the chapter order
def chapters() -> dict:
    order = {}
    for i, nb in enumerate(sorted(NBS.glob("*.ipynb"))):
        m = re.search(r"#\|\s*default_exp\s+(\w+)", nb.read_text())
        if m: order[m.group(1)] = (i, nb.stem)
    return order

def project_imports(path: Path) -> tuple[set, list]:
    "(modules imported at module level, [(function, module)] imported inside functions)."
    tree = ast.parse(path.read_text())
    top, inner = set(), []
    def names(node):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: return [mod.split(".")[0]] if mod else [a.name for a in node.names]
            if mod.startswith("dino_from_scratch"):
                rest = mod.split(".")[1:] if "." in mod else []
                return rest[:1] if rest else [a.name for a in node.names]
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] for a in node.names if a.name.startswith("dino_from_scratch.")]
        return []
    for node in tree.body:
        for n in names(node): top.add(n)
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                for n in names(node): inner.append((fn.name, n))
    mods = {p.stem for p in LIB.glob("*.py")}
    return {n for n in top if n in mods}, [(f, n) for f, n in inner if n in mods]

def graph() -> dict:
    return {p.stem: project_imports(p)[0] for p in sorted(LIB.glob("*.py")) if not p.stem.startswith("_")}

# Modules that an earlier chapter may import although they are taught later, for a configurable option or a recipe
# section; none of them imports its importer, directly or through others (the graph stays acyclic: tested below).
# (schedules_v3 imports koleo, chapter 09, which imports dino, chapter 02: neither imports config.)
ALLOWED_UPWARD = {
    ("vit", "rope"),             # the one ViT takes RoPE as a position-encoding option (chapter 17 teaches it)
    ("dino", "sinkhorn"),        # DINOLoss takes Sinkhorn-Knopp centering as an option (chapter 08)
    ("gram", "schedules_v3"),    # the Gram weight schedule, same (chapter 20 precedes 21 already)
    ("config", "masking"), ("config", "ibot"), ("config", "gram"), ("config", "sharding"),   # recipe sections
    ("config", "schedules_v3"),  # the loss section, DINOv3LossConfig: chapter 02's fields + KoLeo (09) + local weight (20)
    ("config", "vit_v2"), ("config", "vit_v3"),                                               # official ViT shapes of presets
    ("pretrained", "rope"), ("pretrained", "vit_v3"),    # official DINOv3 weights (chapter 14 loads them too)
}

def upward_edges(g=None) -> list:
    g, ch = g or graph(), chapters()
    return sorted((a, b) for a, deps in g.items() for b in deps if a in ch and b in ch and ch[b][0] > ch[a][0])

def find_cycle(g: dict):
    state, stack = {}, []
    def visit(n):
        state[n] = 1; stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1: return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                c = visit(m)
                if c: return c
        state[n] = 2; stack.pop()
    for n in sorted(g):
        if state.get(n) is None:
            c = visit(n)
            if c: return c
    return None


def test_import_graph_is_acyclic():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_cycle_finder_finds_a_planted_cycle():
    g = graph(); g["vit"] = g["vit"] | {"cli"}      # vit -> ... cli -> ... -> vit
    assert find_cycle(g) is not None


def test_no_project_import_inside_a_function():
    found = {p.stem: project_imports(p)[1] for p in LIB.glob("*.py") if not p.stem.startswith("_")}
    found = {k: v for k, v in found.items() if v}
    assert not found, f"project imports inside functions (import at module level instead): {found}"


def test_imports_go_down_the_chapter_order():
    extra = [e for e in upward_edges() if e not in ALLOWED_UPWARD]
    assert not extra, f"modules importing a later chapter: {extra}"


REGISTER = {"register_official_loader", "register_backbone"}   # the registries earlier chapters keep for later ones

def registry_fillers() -> dict:
    "{module defining a register_* function: {modules that call it at module level}} (what chapter 31's _FILLERS must list)."
    defs, calls = {}, {}
    for p in LIB.glob("*.py"):
        tree = ast.parse(p.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name in REGISTER: defs[node.name] = p.stem
            for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
                if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in REGISTER:
                    calls.setdefault(sub.func.id, set()).add(p.stem)
    out = {}
    for fn, mods in calls.items():
        out.setdefault(defs[fn], set()).update(m for m in mods if m != defs[fn])
    return out


def test_top_level_imports_every_registry_filler():
    """A later chapter that registers with an earlier one (instead of being imported by it) must be listed in the top
    level's _FILLERS, which imports it whenever the registry's module is loaded through the package."""
    import dino_from_scratch
    found = registry_fillers()
    assert found.get("pretrained") and found.get("distill"), found           # the scan sees chapter 28's registrations
    listed = {k: set(v) for k, v in dino_from_scratch._FILLERS.items()}
    missing = {k: sorted(v - listed.get(k, set())) for k, v in found.items() if v - listed.get(k, set())}
    assert not missing, f"registering modules missing from dino_from_scratch._FILLERS (chapter 31): {missing}"


if __name__ == "__main__":
    ch = chapters()
    for m, deps in sorted(graph().items(), key=lambda kv: ch.get(kv[0], (99,))[0]):
        print(f"{ch.get(m, (0, '?'))[1]:22s} {m:14s} <- {', '.join(sorted(deps, key=lambda d: ch.get(d, (99,))[0]))}")
    print("cycle:", find_cycle(graph()), "| upward edges:", upward_edges())
