"""The package layout is the architecture: these tests keep it honest (layers, cycles, sizes, one home
per fact). They read the source only; nothing is imported or run."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAINER = REPO / "trainer"

# Lowest layer first: a package may import only from itself and the packages before it.
LAYERS = [
    "core",
    "config",
    "files",
    "parallel",
    "data",
    "diffusion",
    "training",
    "quality",
    "stage0",
    "stage1",
    "stage2",
    "cli",
]


def _modules() -> dict[str, Path]:
    mods = {}
    for root in ("trainer", "models"):
        for p in sorted((REPO / root).rglob("*.py")):
            name = ".".join(p.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(name: str, path: Path, known: set) -> set:
    """The project modules `path` imports, anywhere in the file (function-local imports count)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m in known and m != name}


def _graph():
    mods = _modules()
    return mods, {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring a package's
    __init__ importing its own children."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    _, graph = _graph()
    assert _cycles(graph) == []


def test_cycle_finder_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "trainer" and len(parts) > 1 else None


def test_layers_only_import_downwards():
    _, graph = _graph()
    bad = []
    for mod, deps in graph.items():
        mine = _layer(mod)
        if mine is None or mod.endswith(".__main__"):  # `python -m` launchers sit on top of everything
            continue
        for dep in deps:
            theirs = _layer(dep)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                bad.append(f"{mod} -> {dep}")
    assert bad == []


def test_trainer_listing_is_the_map():
    entries = sorted(p.name for p in TRAINER.iterdir() if p.name != "__pycache__")
    assert entries == sorted(["__init__.py", *LAYERS])
    for pkg in LAYERS:
        doc = ast.get_docstring(ast.parse((TRAINER / pkg / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()) <= 4, f"trainer/{pkg}/__init__.py: a one- or two-line docstring"
    top = ast.get_docstring(ast.parse((TRAINER / "__init__.py").read_text()))
    assert all(f"{pkg}/" in top for pkg in LAYERS), "trainer/__init__.py's map names every package"


def _public_names(package: str) -> set[str]:
    """A package's public names: its __init__'s __all__, read from the source."""
    tree = ast.parse((REPO / package.replace(".", "/") / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _reaches_into(path: Path, package: str) -> list[str]:
    """The imports in `path` that go past `package`'s public names: a submodule, or a name not in __all__."""
    public, bad, where = _public_names(package), [], path.relative_to(path.parents[1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package):
            names = [a.name for a in node.names]
            if node.module != package or any(n not in public for n in names):
                bad.append(f"{where}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            bad += [f"{where}: import {a.name}" for a in node.names if a.name.startswith(package + ".")]
    return bad


def test_quality_is_its_own_layer_below_the_stages():
    assert (TRAINER / "quality" / "__init__.py").is_file()
    assert LAYERS.index("training") < LAYERS.index("quality") < LAYERS.index("stage0")
    _, graph = _graph()
    assert not [
        d
        for m, deps in graph.items()
        if m.startswith("trainer.quality")
        for d in deps
        if d.startswith("trainer.stage")
    ]
    # the `python -m trainer.stage2` launcher (__main__) is the one module that calls the CLI's stage2 command
    assert not [
        d
        for m, deps in graph.items()
        if m.startswith("trainer.stage2") and not m.endswith("__main__")
        for d in deps
        if d.startswith("trainer.cli")
    ]


@pytest.mark.parametrize("package", ["trainer.stage2", "trainer.quality"])
def test_cli_and_bench_use_public_names_only(package):
    files = sorted((REPO / "bench").glob("*.py")) + sorted((TRAINER / "cli").glob("*.py"))
    assert _public_names(package), f"{package} declares no __all__"
    assert [b for f in files for b in _reaches_into(f, package)] == []


def test_public_name_check_can_fail(tmp_path):
    probe = tmp_path / "bench" / "probe.py"
    probe.parent.mkdir()
    probe.write_text(
        "from trainer.stage2.run import setup\nimport trainer.stage2.generation as g\n"
        "from trainer.stage2 import _weights\nfrom trainer.stage2 import setup\n"
    )
    assert len(_reaches_into(probe, "trainer.stage2")) == 3


def test_no_module_over_400_lines():
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert long == {}


def test_models_know_nothing_of_distribution():
    for name, path in _modules().items():
        if name.startswith("models"):
            text = path.read_text()
            assert not re.search(r"^\s*(import|from) (accelerate|torch\.distributed)\b", text, re.M), name
            assert "trainer" not in _imports(name, path, {"trainer"}), name


def _code(path: Path) -> str:
    """The source without docstrings and comments (string literals in code stay)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.unparse(tree)


@pytest.mark.parametrize(
    "pattern",
    [
        "discriminator_iter_",
        "_checkpoint_{",
        "_metrics_iter_",
        "_summary.csv",
        "fake_latents.pt",
        "real_latents.pt",
        "discriminator_best.pt",
        "discriminator_state.pt",
        "discriminator_history.csv",
        "stage2_run.json",
        "timings.csv",
        "samples.png",
        "dataset_latents.pt",
        "checkpoint_{tag}",
        "autoencoder_{tag}",
        "reference_{",
    ],
)
def test_output_paths_are_spelled_in_one_module(pattern):
    where = sorted(
        str(p.relative_to(REPO))
        for n, p in _modules().items()
        if n.startswith("trainer") and pattern in _code(p)
    )
    assert where == ["trainer/files/layout.py"], f"{pattern!r} spelled in {where}"


def test_one_ddim_step():
    """One DDIM step in the trainer. models/pipeline.py is the exception by design: it is copied into every
    exported pipeline folder and must run with diffusers alone, so it has its own sampling loop; that it
    samples exactly what ddim_sample samples is tested in test_diffusers_io."""
    where = sorted(str(p.relative_to(REPO)) for n, p in _modules().items() if ".prev_sample" in _code(p))
    assert where == ["models/pipeline.py", "trainer/diffusion/sampling.py"]
    defs = [
        n
        for n, p in _modules().items()
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == "ddim_step"
    ]
    assert defs == ["trainer.diffusion.sampling"]


def test_no_discriminator_logit_wrappers():
    """D's forward already takes an optional timestep (zeros when it is noise-conditioned and none is
    given): nothing wraps it again."""
    wrappers = [
        f"{n}.{node.name}"
        for n, p in _modules().items()
        if n.startswith("trainer")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef) and "logits" in node.name
    ]
    assert wrappers == []
    assert not any(
        "noise_conditioned" in _code(p) for n, p in _modules().items() if n.startswith("trainer.stage2")
    ), "stage 2 branches on noise_conditioned again"


def test_console_script_entry_point_is_callable():
    """`advdiff` (pyproject's [project.scripts]) must name a function: with trainer.cli a package,
    "trainer.cli:main" would name the submodule and the installed command would fail."""
    import importlib

    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["advdiff"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_readme_is_short_and_ci_runs_its_lint_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert len(readme.splitlines()) < 350, "README.md: results and details belong in docs/"
    lint = "ruff check . && ruff format --check ."
    assert lint in readme and lint in ci
    assert ci.index(lint) < ci.index("python3 -m pytest -q tests"), "CI lints before the tests"
