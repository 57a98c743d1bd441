"""The layering rules of docs/architecture.md, checked on the import graph of ``diffusion_lm/``.

Every ``import`` / ``from ... import`` of every module is read with ``ast`` (function-local imports
included), resolved to a module of the package, and checked against the layers; a few calls that
belong to one module only are checked the same way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffusion_lm"

# Bottom to top; a module may import its own layer and the layers below, never one above.
LAYERS = [
    ("plain", ["errors", "version", "files", "seeding", "denoiser", "schedules", "objective", "metrics",
               "chat", "sampling", "likelihood"]),
    ("model parts", ["backbone", "adapters", "checkpoint_io", "resume", "preemption", "distributed", "data"]),
    ("model", ["module", "callbacks", "health", "ema"]),
    ("library", ["loading", "export", "pipeline", "evaluation", "serve", "eval_harness", "__init__"]),
    ("commands", ["cli", "__main__"]),
]
LIGHTNING = ("lightning", "pytorch_lightning", "lightning_fabric")


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for rank, (_, names) in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS (and of docs/architecture.md): add it")


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def _imports(module: str) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` of every import statement, anywhere in the file."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            out.append((node.lineno, base, [alias.name for alias in node.names]))
    return out


def _targets(base: str, names: list[str]) -> list[str]:
    """The package modules an import loads: ``from pkg import submodule`` loads the submodule."""
    if not base.startswith("diffusion_lm"):
        return []
    subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
    if subs and len(subs) == len(names):
        return subs
    return ([base] if base in MODULES else []) + subs


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for _, base, names in _imports(module):
            graph[module].update(t for t in _targets(base, names) if t != module)
    return graph


def test_every_module_is_in_a_layer_and_imports_only_its_layer_and_below():
    problems = []
    for module in MODULES:
        rank = _layer(module)
        for line, base, names in _imports(module):
            for target in _targets(base, names):
                if _layer(target) > rank:
                    problems.append(f"{module}:{line} ({LAYERS[rank][0]}) imports {target} "
                                    f"({LAYERS[_layer(target)][0]})")
    assert not problems, "\n".join(problems)


def test_plain_layers_import_no_lightning():
    problems = []
    for module in MODULES:
        if _layer(module) != 0:
            continue
        for line, base, _ in _imports(module):
            if base.split(".")[0] in LIGHTNING:
                problems.append(f"{module}:{line} imports {base}")
    assert not problems, "\n".join(problems)


def test_nothing_below_the_commands_imports_them():
    commands = [m for m in MODULES if m.startswith("diffusion_lm.cli") or m == "diffusion_lm.__main__"]
    problems = [f"{module}:{line} imports {base}" for module in MODULES if module not in commands
                for line, base, names in _imports(module)
                if any(t.startswith("diffusion_lm.cli") for t in _targets(base, names))]
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = _edges()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def _calls(module: str, attribute: str) -> list[int]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == attribute or getattr(node.func, "id",
                                                                          None) == attribute)]


@pytest.mark.parametrize("call, owners", [
    ("load_from_checkpoint", {"diffusion_lm.loading"}),  # a checkpoint -> a model
    ("read_diffusion_config", {"diffusion_lm.loading"}),  # an export folder -> a model
    ("from_pretrained",
     {"diffusion_lm.backbone", "diffusion_lm.loading"}),  # hub/folder encoders, export reloads
    ("load", {"diffusion_lm.checkpoint_io"}),  # torch.load: the one reader of checkpoint files
])
def test_only_the_loading_modules_turn_a_path_into_a_model(call, owners):
    found = {module for module in MODULES if _calls(module, call)}
    if call == "load":  # only torch.load: other .load calls (yaml, json) are fine
        found = {m for m in found if "torch.load(" in MODULES[m].read_text(encoding="utf-8")}
    assert found <= owners, f"{call}() called in {sorted(found - owners)}; only {sorted(owners)} may"


def test_only_the_model_turns_text_into_an_answer():
    """The sampler's ``generate`` is called by ``MaskedDiffusionLM.generate`` only (its own package
    and the public re-exports aside)."""
    problems = []
    for module in MODULES:
        if module.startswith("diffusion_lm.sampling") or module in ("diffusion_lm", "diffusion_lm.module"):
            continue
        for line, base, names in _imports(module):
            if base.startswith("diffusion_lm.sampling") and "generate" in names:
                problems.append(f"{module}:{line} imports the sampler's generate")
    assert not problems, "\n".join(problems)


def test_data_never_reads_the_trainers_model():
    problems = []
    for module, path in MODULES.items():
        if not module.startswith("diffusion_lm.data"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        problems += [f"{module}:{node.lineno}" for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and node.attr == "lightning_module"]
        problems += [f"{module}:{node.lineno} (getattr)" for node in ast.walk(tree)
                     if isinstance(node, ast.Constant) and node.value == "lightning_module"]
    assert not problems, "data/ reads trainer.lightning_module: " + ", ".join(problems)
