"""Where the service's poll thread spends its CPU: py-spy samples of a bench run.

``bench --profile DIR`` attaches py-spy (a sampling profiler that reads the interpreter's
memory from outside, so the service runs unmodified) to each service run and keeps its raw
collapsed stacks in ``DIR``. :func:`summarize` turns them into the answer the issue asks
for when a target is missed: which stage limits it. Each on-CPU sample of the poll thread
taken inside ``Service.step`` is attributed to

* the learner library (``river`` / ``sklearn``) when any of its frames is on the stack:
  the model's own predict / learn, which no service code can make cheaper; otherwise
* the innermost stream-trainer function on the stack (``records.DecodedBatch.x_dicts``,
  ``consumer.KafkaSource.consume``, ...): the service's own cost, named where it is spent.

Samples outside ``Service.step`` (start-up, restore, shutdown) are counted apart.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stream_trainer.errors import StreamTrainerError
from stream_trainer.operations.processes import tail_file

SAMPLE_RATE_HZ = 100
POLL_THREAD = "MainThread"  # app.py runs the poll loop on the main thread
LOOP_FRAME = "Service.step"
LEARNER_PACKAGES = ("river", "sklearn")
OUTSIDE_LOOP = "(outside the poll loop)"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>[^()]*?)(?::\d+)?\)$")
_ATTACH_TIMEOUT_S = 10.0


class ProfilerError(StreamTrainerError):
    """py-spy is missing, may not attach (ptrace), or failed; the text says what to do."""


def py_spy_executable() -> str:
    """py-spy on PATH or beside this interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).with_name("py-spy")
    found = shutil.which("py-spy") or (str(beside) if beside.exists() else None)
    if found is None:
        raise ProfilerError(
            "--profile needs py-spy: pip install 'stream-trainer[profile]' (or py-spy)"
        )
    return found


@dataclass
class Profiler:
    """A py-spy recording of one process; :meth:`stop` ends it and waits for the file."""

    process: subprocess.Popen[bytes]
    output: Path
    log: Path

    @classmethod
    def attach(cls, pid: int, output: Path) -> Profiler:
        """Start sampling ``pid`` (on-CPU samples, thread names, full file names).

        ``--nonblocking``: the service is not paused per sample, so the profile costs it
        well under 1 % at 100 Hz (a stack may rarely be torn; the shares are unaffected).
        Raises ProfilerError if py-spy exits at once (no ptrace permission, say)."""
        output.parent.mkdir(parents=True, exist_ok=True)
        log = output.with_suffix(".log")
        command = [
            py_spy_executable(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(SAMPLE_RATE_HZ),
            "--format",
            "raw",
            "--threads",
            "--full-filenames",
            "--function",
            "--nonblocking",
            "--output",
            str(output),
        ]
        with log.open("wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
        profiler = cls(process, output, log)
        profiler._wait_until_sampling()
        return profiler

    def _wait_until_sampling(self) -> None:
        # py-spy prints "Sampling process ..." once attached; a refusal ends it instead.
        deadline = time.monotonic() + _ATTACH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ProfilerError(
                    f"py-spy could not profile the service (exit {self.process.returncode}); "
                    "it needs ptrace: run as root or grant CAP_SYS_PTRACE "
                    f"(kernel.yama.ptrace_scope): {tail_file(self.log, 5)}"
                )
            if b"Sampling process" in self.log.read_bytes():
                return
            time.sleep(0.05)  # bounded poll for py-spy's own start-up line
        self.close()
        raise ProfilerError(f"py-spy did not start sampling in {_ATTACH_TIMEOUT_S:.0f} s")

    def stop(self) -> Path:
        """SIGINT (py-spy then writes its file) and wait; returns the raw stacks' path."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        self.close()
        if not self.output.exists():
            raise ProfilerError(f"py-spy wrote no profile: {tail_file(self.log, 5)}")
        return self.output

    def close(self) -> None:
        """Kill py-spy if it still runs (no profile is written then). Idempotent."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _frames(line: str) -> tuple[str, list[tuple[str, str]], int] | None:
    """(thread name, [(function, path)] outermost first, count) of one raw line."""
    stack, _, count = line.rpartition(" ")
    if not stack or not count.isdigit():
        return None
    head, *rest = stack.split(";")
    if not head.startswith("thread ("):
        return None
    thread = head.partition(": ")[2]
    frames: list[tuple[str, str]] = []
    for frame in rest:
        match = _FRAME.match(frame)
        frames.append((match["function"], match["path"]) if match else (frame, ""))
    return thread, frames, int(count)


def _package(path: str) -> str | None:
    parts = Path(path).parts
    for package in LEARNER_PACKAGES:
        if package in parts:
            return package
    return None


def _module_function(function: str, path: str) -> str | None:
    parts = Path(path).parts
    if "stream_trainer" not in parts:
        return None
    last = len(parts) - 1 - parts[::-1].index("stream_trainer")  # the innermost one
    inside = parts[last + 1 :]
    module = ".".join([*inside[:-1], Path(inside[-1]).stem]) if inside else "stream_trainer"
    return f"{module}.{function}"


def attribute(frames: list[tuple[str, str]]) -> str:
    """The stage one poll-thread sample is charged to (see the module docstring)."""
    if not any(function == LOOP_FRAME for function, _ in frames):
        return OUTSIDE_LOOP
    for _, path in frames:
        package = _package(path)
        if package is not None:
            return f"{package} (learner library)"
    for function, path in reversed(frames):
        named = _module_function(function, path)
        if named is not None:
            return named
    return frames[-1][0] if frames else "(no frame)"


def attribute_raw(text: str, thread: str = POLL_THREAD) -> Counter[str]:
    """Samples per stage of ``thread`` in py-spy's raw (collapsed stack) output."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        parsed = _frames(line.strip())
        if parsed is None or parsed[0] != thread:
            continue
        _, frames, count = parsed
        counts[attribute(frames)] += count
    return counts


def summarize(counts: list[Counter[str]], top: int = 12) -> dict[str, Any]:
    """Shares of the poll loop's samples over all runs: the ``top`` stages, the rest summed.

    ``loop_samples`` counts samples inside ``Service.step``; ``shares`` are fractions of
    those; ``learner_share`` (and ``per_run_learner_share``, each run's) is the share of
    the learner's own work (:func:`is_learner`), the rest is the service's overhead."""
    total: Counter[str] = Counter()
    for run in counts:
        total.update(run)
    outside = total.pop(OUTSIDE_LOOP, 0)
    loop = sum(total.values())
    ranked = total.most_common()
    shares = {name: n / loop for name, n in ranked[:top]} if loop else {}
    rest = sum(n for _, n in ranked[top:])
    if rest:
        shares["(everything else)"] = rest / loop
    return {
        "sampler": f"py-spy {SAMPLE_RATE_HZ} Hz, on-CPU samples of the poll thread",
        "loop_samples": loop,
        "outside_loop_samples": outside,
        "learner_share": _learner_share(total),
        "per_run_learner_share": [_learner_share(run) for run in counts],
        "shares": shares,
    }


def is_learner(stage: str) -> bool:
    """The work the learner ceiling times: the library and the model adapter around it."""
    return stage.endswith("(learner library)") or stage.startswith("learners.")


def _learner_share(run: Counter[str]) -> float:
    loop = {name: n for name, n in run.items() if name != OUTSIDE_LOOP}
    learner = sum(n for name, n in loop.items() if is_learner(name))
    return learner / sum(loop.values()) if loop else 0.0


def profile_path(directory: Path, mode: str, repeat: int) -> Path:
    """Where repeat ``repeat`` (0-based) of ``mode`` keeps its raw stacks."""
    return directory / f"service-{mode}-r{repeat + 1}.txt"
