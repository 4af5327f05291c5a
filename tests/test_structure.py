"""The package's structure, read from its source with ``ast``: the modules import one another
without a cycle, and no module imports anything inside a function but an optional dependency (an
import there would hide a cycle, or a dependency that a reader copying the module out would miss)."""
import ast
import os

import pixel_bert

PACKAGE_DIR = os.path.dirname(pixel_bert.__file__)
# Imports inside functions that are allowed: optional dependencies, loaded only when there
OPTIONAL = {"torch.utils.tensorboard"}


def modules():
    return sorted(name[:-3] for name in os.listdir(PACKAGE_DIR) if name.endswith(".py") and name != "__init__.py")


def imported_modules(node, module: str):
    """(target module or None, the import node) for one import statement of ``module``."""
    if isinstance(node, ast.ImportFrom):
        if node.level:  # from .x import y / from . import x
            if node.module:
                return [node.module.split(".")[0]]
            return [alias.name for alias in node.names]
        if node.module == "pixel_bert":
            return [alias.name for alias in node.names]
        if node.module and node.module.startswith("pixel_bert."):
            return [node.module.split(".")[1]]
        return []
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("pixel_bert.")]
    return []


def import_graph():
    graph, nested = {}, []
    for module in modules():
        tree = ast.parse(open(os.path.join(PACKAGE_DIR, module + ".py"), encoding="utf-8").read())
        edges = set()
        for node in ast.walk(tree):
            targets = [t for t in imported_modules(node, module) if t in modules()]
            edges.update(targets)
        for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            for node in ast.walk(func):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    if not any(n in OPTIONAL for n in names if n):
                        nested.append(f"{module}.py:{node.lineno} ({func.name}): "
                                      f"{ast.unparse(node)}")
        graph[module] = edges - {module}
    return graph, nested


def find_cycle(graph):
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None
    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 20 and graph["trainer"] >= {"optim", "checkpoints", "saved_model"}  # the graph is read
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_no_import_inside_a_function_but_optional_dependencies():
    _, nested = import_graph()
    assert not nested, "imports inside functions (move them to the top of the module):\n" + "\n".join(nested)


def test_the_model_files_need_only_torch_and_torchvision():
    """model.py, heads.py and losses.py copy out together (tests/test_standalone.py runs the copies):
    they import nothing of the package beyond one another."""
    graph, _ = import_graph()
    assert graph["model"] == set()
    assert graph["heads"] <= {"model"} and graph["losses"] <= {"model"}
