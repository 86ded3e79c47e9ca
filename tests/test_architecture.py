"""The import graph of the package: no cycles, no imports that climb back up the layers (read with ast)."""

import ast
from pathlib import Path

import torch

import purifytf

ROOT = Path(purifytf.__file__).parent

LAYERS = [
    # evaluation.report is a file format with no purifytf imports (hub.model_card(eval_run=) reads it); it
    # would sit better outside the evaluation package, whose __init__ it loads
    ("purifytf.config", "purifytf.functional", "purifytf.random", "purifytf.nfe", "purifytf.inputs",
     "purifytf.evaluation.report"),
    ("purifytf.diffusion", "purifytf.checkpoints", "purifytf.models", "purifytf.saliency", "purifytf.score",
     "purifytf.data"),
    ("purifytf.base", "purifytf.hub"),
    ("purifytf.purifiers", "purifytf.classifiers"),
    ("purifytf.factory", "purifytf.defended", "purifytf.attacks"),
    ("purifytf.pretrained", "purifytf.evaluation", "purifytf.train", "purifytf.demo", "purifytf.purify",
     "purifytf.app", "purifytf.__main__"),
]
"""Low to high: a module imports only from its own layer or lower ones."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """purifytf modules ``path`` imports anywhere in its body (function-level imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(paths)) for name, path in paths.items()}


def layer(name: str) -> int:
    for rank, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return rank
    return len(LAYERS)  # the package's __init__ re-exports everything


def is_parent_package(module: str, target: str) -> bool:
    return module.startswith(target + ".")


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer(m) == len(LAYERS) and m != "purifytf"] == []


def test_no_import_climbs_up_the_layers():
    upward = [f"{m} -> {t}" for m, targets in graph().items() for t in targets
              if layer(t) > layer(m) and not is_parent_package(m, t)]
    assert upward == []


def test_evaluation_does_not_import_training():
    assert [f"{m} -> {t}" for m, targets in graph().items() for t in targets
            if m.startswith("purifytf.evaluation") and t.startswith("purifytf.train")] == []


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if is_parent_package(node, target):  # importing one's own package runs its __init__ first
                continue
            if state.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_straight_through_is_exact_forward_and_surrogate_backward():
    from purifytf.functional import straight_through, to_image_space, to_model_space

    leaf = torch.tensor([0.3, 1.7, 2.5000001], requires_grad=True)
    t = leaf * 40
    out = straight_through(t.detach().round(), t)
    assert torch.equal(out, t.detach().round())  # bit for bit, not approximately
    out.sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(leaf, 40.0))
    x = torch.rand(2, 3)
    assert torch.equal(to_image_space(to_model_space(x)), x)
