"""Progress of long commands: a bar on stderr when it is a terminal, nothing extra in a pipe (logs, tests) or
under --json, and stdout the same either way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading

import pytest

from runtime.core.bundle import DEFAULT_BUNDLE
from tests.conftest import run_speed, write_cluster

pytestmark = pytest.mark.cluster  # its tests run the speed command in a terminal of its own

# a terminal rich draws on, whatever the environment running the tests says
TERMINAL = {"TERM": "xterm-256color", "COLUMNS": "120", "PYTHONWARNINGS": "ignore"}
FAST_BENCH = ["bench", "--local", "--new-tokens", "4", "--repeats", "1"]
COUNTING = """
from runtime.cli.progress import stderr_progress

progress = stderr_progress(json_output={json_output})
progress.note("counting")
with progress.task("units counted", total=3):
    for _ in range(3):
        progress.advance(status="going well")
print("done")
"""


def on_a_terminal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a command with stderr on a pseudo-terminal and stdout on a pipe; its stderr is what the terminal got."""
    controller, terminal = os.openpty()
    received = bytearray()
    reader = threading.Thread(target=read_until_closed, args=(controller, received), daemon=True)
    reader.start()  # while the command runs: a full terminal would stall it
    try:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal, text=True,
                                timeout=timeout, env={**os.environ, **TERMINAL})
    finally:
        os.close(terminal)  # the last copy of the command's end: the reader then reaches the end
        reader.join(timeout=10)
        os.close(controller)
    result.stderr = received.decode(errors="replace")
    return result


def read_until_closed(controller: int, into: bytearray) -> None:
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the other end is closed and everything it wrote was read
            return
        if not chunk:
            return
        into.extend(chunk)


def speed_on_a_terminal(*args: str) -> subprocess.CompletedProcess:
    return on_a_terminal(sys.executable, "-m", "runtime.cli", *args)


def finished_bar(terminal_text: str, description: str) -> bool:
    """The terminal was shown the task with every unit done, e.g. "graphs quantized ━━━ 2/2"."""
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal_text)  # colours and cursor moves
    return re.search(rf"{re.escape(description)} \S+ (\d+)/\1 ", plain) is not None


def test_a_terminal_gets_notes_and_a_bar_with_its_status():
    result = on_a_terminal(sys.executable, "-c", COUNTING.format(json_output=False))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert "counting" in result.stderr and "going well" in result.stderr
    assert finished_bar(result.stderr, "units counted")


def test_under_json_a_terminal_gets_the_notes_only():
    result = on_a_terminal(sys.executable, "-c", COUNTING.format(json_output=True))
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "counting\r\n")  # the terminal's newline


def test_a_pipe_gets_the_notes_only():
    result = subprocess.run([sys.executable, "-c", COUNTING.format(json_output=False)], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "done\n", "counting\n")


def test_speed_quantize_shows_its_graphs_on_a_terminal_and_only_its_notes_in_a_pipe(tmp_path):
    shown = speed_on_a_terminal("quantize", str(DEFAULT_BUNDLE), str(tmp_path / "terminal"))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"wrote bundle {tmp_path / 'terminal'}\n"
    assert finished_bar(shown.stderr, "graphs quantized")

    piped = run_speed("quantize", str(DEFAULT_BUNDLE), str(tmp_path / "piped"))
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == f"wrote bundle {tmp_path / 'piped'}\n"
    assert piped.stderr.splitlines() == ["quantizing stage.onnx to int4 ...", "quantizing head.onnx to int4 ...",
                                         "storing the embedding table as int8 rows ..."]


def test_speed_bench_counts_its_runs_on_a_terminal_but_not_under_json():
    shown = speed_on_a_terminal(*FAST_BENCH)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("sequential vs speculative decoding of demo-4x3") and "\x1b" not in shown.stdout
    assert finished_bar(shown.stderr, "runs")

    as_json = speed_on_a_terminal(*FAST_BENCH, "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stderr == ""
    assert json.loads(as_json.stdout)["bundle"] == "demo-4x3"


def test_speed_up_counts_the_nodes_registering_then_prints_as_before(tmp_path, state_dir):
    path = write_cluster(tmp_path)
    try:
        started = speed_on_a_terminal("up", str(path), "--detach")
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("cluster ") and "is serving" in started.stdout
        assert "\x1b" not in started.stdout
        assert finished_bar(started.stderr, "nodes registered")
    finally:
        assert run_speed("down", str(path)).returncode == 0
