"""The house's layers, read from the imports (ast), so that the picture in the README stays true:

    base  <-  progan.model  <-  progan.training (the job) / the tools  <-  launch.py

base/ imports nothing of ours; the model imports neither Ray nor the data pipeline; the tools
(progan's commands and progan.metrics) never import the training job; cluster/ and monitoring/
sit on the base; the data pipeline never imports progan. Every import counts, also those inside
functions, since they run all the same."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS_ROOTS = ("base", "progan", "data_pipeline", "cluster", "monitoring")  # and launch.py

# each part, and the parts (and third-party packages) it must not import
PARTS = {
    "base": "base",
    "model": "progan.model",
    "training": "progan.training",
    "metrics": "progan.metrics",
    "data_pipeline": "data_pipeline",
    "cluster": "cluster",
    "monitoring": "monitoring",
    "launcher": "launch",
}
ALLOWED = {
    "base": set(),
    "cluster": {"base"},
    "monitoring": {"base"},
    "model": {"base"},
    "data_pipeline": {"base", "cluster", "monitoring"},
    "metrics": {"base", "model", "data_pipeline"},
    "tools": {"base", "model", "metrics", "data_pipeline"},
    "training": {"base", "model", "metrics", "data_pipeline", "cluster", "monitoring"},
    "launcher": {"base", "model", "metrics", "data_pipeline", "cluster", "monitoring", "training", "tools"},
}
NOT_THIRD_PARTY = {"base": {"ray", "torch"}, "model": {"ray"}}


def part_of(module: str) -> str | None:
    """The layer a module of ours belongs to; progan's other modules are the tools."""
    for part, prefix in PARTS.items():
        if module == prefix or module.startswith(prefix + "."):
            return part
    if module == "progan" or module.startswith("progan."):
        return "tools"
    return None


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    path = root.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones resolved; `from a import b`
    counts as an import of a.b where that is a module (`from progan import evaluate`)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if is_module(submodule, root) else base))
    return found


def layer_violations(root: Path = REPO) -> list[str]:
    wrong = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if relative.parts[0] not in PARTS_ROOTS and relative != Path("launch.py"):
            continue
        part = part_of(module_name(path, root))
        for line, target in imports_of(path, root):
            if target.split(".")[0] in NOT_THIRD_PARTY.get(part, ()):
                wrong.append(f"{relative}:{line}: the {part} imports {target}")
            other = part_of(target)
            if other and other != part and other not in ALLOWED[part]:
                wrong.append(f"{relative}:{line}: the {part} imports {target} (the {other})")
    return sorted(wrong)


def test_no_part_imports_a_part_above_it():
    assert layer_violations() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The test above can fail: a model module that imports the training job, one of the tools
    that imports the job, and the base importing Ray are each reported."""
    (tmp_path / "progan" / "model").mkdir(parents=True)
    (tmp_path / "base").mkdir()
    (tmp_path / "progan" / "model" / "net.py").write_text("def f():\n    from progan.training import train_loop\n")
    (tmp_path / "progan" / "evaluate.py").write_text("from progan.training.run_log import STOP_FILE\n")
    (tmp_path / "base" / "x.py").write_text("import ray\n")
    assert layer_violations(tmp_path) == [
        "base/x.py:1: the base imports ray",
        "progan/evaluate.py:1: the tools imports progan.training.run_log (the training)",
        "progan/model/net.py:2: the model imports progan.training (the training)",
    ]


@pytest.mark.parametrize("module, part", [("progan.model.networks", "model"), ("progan.evaluate", "tools"),
                                          ("progan.metrics.swd", "metrics"), ("launch", "launcher"),
                                          ("progan.training.train_loop", "training"), ("numpy", None)])
def test_each_module_has_its_part(module, part):
    assert part_of(module) == part
