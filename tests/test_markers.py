"""The tiers hold (issue 31): markers sit on tests, every declared marker is used, and a unit test cannot load a
weights file or start a server or browser (tests/conftest.py's guard)."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import nst.engine.stylizer
import nst.engine.weights
from nst.params import StyleParams
from tests.conftest import ALL, ENGINE_TESTS, UnitTierViolation, heavy_command

TESTS = Path(__file__).parent
TIER_MARKERS = ("slow", "browser", "vgg")


def modules() -> list[Path]:
    return sorted(TESTS.glob("*.py"))


def mark_name(decorator: ast.expr) -> str | None:
    """`x` for a decorator `pytest.mark.x` or `pytest.mark.x(...)`, else None."""
    node = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "mark":
        return node.attr
    return None


def test_tier_markers_sit_on_tests_not_on_helpers() -> None:
    """`@pytest.mark.slow` on a helper or fixture marks nothing: the test that uses it would run in the faster tiers."""
    misplaced = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            is_test = node.name.startswith("Test" if isinstance(node, ast.ClassDef) else "test")
            marks = [m for m in map(mark_name, node.decorator_list) if m in TIER_MARKERS]
            if marks and not is_test:
                misplaced.append(f"{path.name}:{node.lineno} {node.name} (@pytest.mark.{marks[0]})")
    assert misplaced == []


def test_every_marker_declared_in_pyproject_is_used() -> None:
    config = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    declared = [line.split(":", 1)[0].strip() for line in config["markers"]]
    sources = "\n".join(p.read_text() for p in modules())
    assert set(TIER_MARKERS) | {"unit"} <= set(declared)
    assert [m for m in declared if f"pytest.mark.{m}" not in sources] == []


def imports_playwright(tree: ast.AST) -> bool:
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    return any(name.split(".")[0] == "playwright" for name in names)


def test_modules_that_drive_a_browser_mark_it() -> None:
    unmarked = []
    for path in modules():
        text = path.read_text()
        if imports_playwright(ast.parse(text)) and "pytest.mark.browser" not in text:
            unmarked.append(path.name)
    assert unmarked == []


def test_every_test_named_in_engine_tests_exists() -> None:
    """A stale entry (a test renamed or moved) would put that test in the unit tier: each listed name must exist."""
    missing = []
    for module, names in ENGINE_TESTS.items():
        if not (TESTS / module).is_file():
            missing.append(module)
            continue
        tree = ast.parse((TESTS / module).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        missing += [f"{module}::{name}" for name in sorted(names - defined) if names is not ALL]
    assert missing == []


def test_a_unit_test_cannot_load_weights_or_start_a_server(
    request: pytest.FixtureRequest, unit_tier_reached: list[str]
) -> None:
    assert request.node.get_closest_marker("unit") is not None
    with pytest.raises(UnitTierViolation, match="loads a weights file or builds the VGG network"):
        nst.engine.stylizer.Stylizer().network(StyleParams(), torch.device("cpu"))  # the engine's default network
    with pytest.raises(UnitTierViolation, match="SeaweedFS"):
        subprocess.run(["/nonexistent/weed", "server"], check=False)
    app = "prefect.server.api.server:create_app"  # how Prefect starts its in-process (ephemeral) API
    with pytest.raises(UnitTierViolation, match="Prefect API"):
        subprocess.Popen(args=[sys.executable, "-m", "uvicorn", "--factory", app])
    assert len(unit_tier_reached) == 3
    unit_tier_reached.clear()  # else this test fails, as does a unit test that caught the error
    assert subprocess.run([sys.executable, "-c", "pass"], check=False).returncode == 0  # other commands run


@pytest.mark.parametrize(
    ("argv", "heavy"),
    [
        (["/venv/bin/prefect", "server", "start"], True),
        (["/venv/bin/prefect", "worker", "start", "--pool", "p"], True),
        (["/usr/bin/chromium", "--headless"], True),
        (["node", "cli.js", "run-driver"], True),
        (["/venv/bin/prefect", "deployment", "ls"], False),
        ("git status", False),
    ],
)
def test_heavy_commands_are_recognised(argv: list[str] | str, heavy: bool) -> None:
    assert (heavy_command(argv) is not None) == heavy


def test_children_of_the_suite_can_be_stopped_with_sigint() -> None:
    # Servers and workers are stopped with SIGINT; started in the background the suite inherits it ignored, and
    # tests/conftest.py restores it, so each child starts with Python's Ctrl-C handler (not SIG_IGN's 1).
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "True"
