"""The package's import graph reads top-down: cli -> (sweep, which launches whole runs) -> pipeline,
selftest -> stages -> (models, data, latent, eval, rundir, registry, runtime, config) -> (ops, envs,
kernels, extras); no stage imports another."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lapo_fast"
LAYERS = {"cli": 4, "sweep": 3, "pipeline": 3, "selftest": 3, "fidelity": 3,
          "stages": 2, "models": 1, "data": 1, "eval": 1,
          "rundir": 1, "runtime": 1, "latent": 1, "registry": 1,
          "config": 1, "ops": 0, "envs": 0, "kernels": 0, "_C": 0, "demonstrators": 0,
          "extras": 0, "choices": 0, "machine": 0, "layout": 0}


def _part(module: str) -> str:
    """'lapo_fast.stages.lam' -> 'stages'."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _imports(path: Path) -> set[str]:
    """The lapo_fast modules a file imports (lazily inside functions too), absolute names."""
    here = "lapo_fast." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = here if path.name == "__init__.py" else here.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] if base.count(".") == 0 else [base]
            found.update(n for n in names if n.startswith("lapo_fast."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lapo_fast."))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PACKAGE)) for p in FILES])
def test_imports_point_down(path):
    me = _part("lapo_fast." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    for module in _imports(path):
        other = _part(module)
        if other not in LAYERS and not (PACKAGE / other).exists() and not (PACKAGE / f"{other}.py").exists():
            continue  # an attribute of the package itself (__version__)
        assert LAYERS[other] <= LAYERS[me], f"{path.name} ({me}) imports {module} from a layer above"
        if me == "stages" and other == "stages":
            assert module.split(".")[2] in ("", path.stem), f"stage {path.name} imports another stage: {module}"


def test_every_part_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert parts <= set(LAYERS), parts - set(LAYERS)
