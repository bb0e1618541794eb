"""The layers of docs/architecture.md, checked on the source: every import counts, those under
`if TYPE_CHECKING:` and those inside functions included. Run with -s to see the graph."""

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cifarlab"
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = SRC.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or path.is_dir()


def imported_modules(path: Path) -> set[str]:
    """The cifarlab modules a source file imports, anywhere in it."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from . import runs` imports the module cifarlab.runs
                if alias.name == "__version__":  # the package's version string, not its public API
                    continue
                candidate = f"{module}.{alias.name}"
                found.add(candidate if is_module(candidate) else module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "cifarlab" or m.startswith("cifarlab.")}


def import_graph() -> dict[str, set[str]]:
    """module -> the cifarlab modules it imports (the package's lazy public names left out)."""
    return {module_name(path): imported_modules(path) - {module_name(path)} for path in SRC.rglob("*.py")
            if path != SRC / "__init__.py"}


def part(module: str) -> str:
    """cifarlab.train.trainer -> train; cifarlab.api -> api."""
    return module.split(".")[1] if "." in module else "cifarlab"


def test_imports_point_down_with_no_cycle():
    graph = import_graph()
    below_api = ("train", "analysis", "data", "models", "evaluation", "runs", "config", "yamlfiles", "processes",
                 "hooks", "errors", "files", "settings", "optional", "export", "studies", "explore", "demo")
    for module, targets in graph.items():
        parts = {part(t) for t in targets}
        if part(module) == "train":
            assert "analysis" not in parts, (module, targets)
        if part(module) == "analysis":
            assert "train" not in parts, (module, targets)
        if part(module) in below_api:
            assert not parts & {"api", "cli", "cifarlab"}, (module, targets)
        if part(module) not in ("api", "experiments", "cli", "studies", "__main__"):
            assert "studies" not in parts, (module, targets)
    # the command line is a thin client: the public API, config loading and errors only
    command_line = {"cifarlab.cli", "cifarlab.cli_studies", "cifarlab.console", "cifarlab.__main__"}
    for module in command_line:
        assert graph[module] <= {"cifarlab", "cifarlab.config", "cifarlab.errors", *command_line}, graph[module]
    for module, targets in graph.items():
        assert module in command_line or not targets & command_line, (module, targets)

    def cycle_from(node, trail):
        for nxt in sorted(graph.get(node, ())):
            if nxt in trail:
                return trail[trail.index(nxt):] + [nxt]
            found = cycle_from(nxt, trail + [nxt])
            if found:
                return found
        return None

    for start in graph:
        cycle = cycle_from(start, [start])
        assert cycle is None, f"import cycle: {' -> '.join(cycle)}"

    edges = defaultdict(set)
    for module, targets in graph.items():
        edges[part(module)].update(part(t) for t in targets if part(t) != part(module))
    print("\nimport graph (package level):")
    for name in sorted(edges, key=lambda n: (-len(edges[n]), n)):
        print(f"  {name:12s} -> {', '.join(sorted(edges[name])) or '-'}")


def test_no_module_is_crowded():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    crowded = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not crowded, crowded
    assert sizes["cifarlab.train.trainer"] <= 400 and sizes["cifarlab.cli"] <= 400, sizes


def test_the_training_loop_has_no_data_parallel_branches():
    source = (SRC / "train" / "trainer.py").read_text()
    for word in ("world", "rank", "is_main", "distributed."):
        loop = source[source.index("def run_epoch"):source.index("def stop_for_signal")]
        assert word not in loop, word
