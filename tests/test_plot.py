"""`speed bench ... --plot FILE`: a figure of every kind of benchmark report, drawn from the report itself or
from its saved JSON (--plot-from); bad paths refused before the run; nothing half-written left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.bench.load import Tally, chaos_report, load_report
from runtime.bench.plot import plot_bench, report_kind
from runtime.bench.tally import ModeTally
from runtime.cli.main import main
from runtime.core.errors import SpeedError
from runtime.core.generation import SpeculationStats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAGIC = {".png": PNG_MAGIC, ".svg": b"<?xml", ".pdf": b"%PDF"}
NO_MATPLOTLIB = "--plot needs matplotlib, the plot extra; install it with: pip install -e '.[plot]'"


# ---- reports in the shape each benchmark returns ----

def speculation(*flips: float) -> dict:
    """What ModeTally.speculation() gives after one run with these flip rates."""
    tally = ModeTally()
    tally.add(100.0, SpeculationStats(ticks=40, committed=32, flips_per_boundary=flips, flushed_steps=9, held_guesses=2))
    return tally.speculation()


def reference_report() -> dict:
    return {"bundle": "demo-4x3", "bundle_bytes": 17995560, "temperature": 0.0, "new_tokens": 64, "repeats": 3,
            "threads": 1, "tokens_per_s": {"onnx": 549.0, "torch": 129.0, "context_32": 540.2, "context_512": 402.5,
                                           "threads_1": 548.1, "threads_2": 731.0},
            "onnx_over_torch": 4.26, "context_512_over_32": 0.75}


def local_report(*, gated: bool = True) -> dict:
    report = {"bundle": "demo-4x3", "temperature": 0.0, "new_tokens": 128, "runs": 12,
              "sequential_tokens_per_s": 512.0, "speculative_tokens_per_s": 656.0, "speedup": 1.28,
              **speculation(0.137, 0.068), "steps_per_token": {"measured": 1.273, "cost_model": 1.274},
              "pass_cost_us": {"1_token": 1740, "3_tokens": 2560, "ratio": 1.47}, "predicted_speedup": 1.31}
    if gated:
        report["gated"] = {"guess_thresholds": [0.3, 0.3], "tokens_per_s": 640.2, "speedup": 1.25,
                           **speculation(0.09, 0.04)}
    return report


def cluster_report() -> dict:
    return {"cluster": "local", "bundle": "demo-4x3", "nodes": 3,
            "emulated_link_ms": {"edge-1": 5.0, "edge-2": 5.0, "edge-3": 5.0}, "temperature": 0.8, "new_tokens": 128,
            "runs": 12, "reference_tokens_per_s": 512.3, "sequential_tokens_per_s": 124.0,
            "speculative_tokens_per_s": 156.1, "speculative_plain_guesses_tokens_per_s": 140.0,
            "gated_tokens_per_s": 150.2, "speedup": 1.26, "sequential_over_reference": 0.24,
            **speculation(0.137, 0.068), "speedup_plain_guesses": 1.13, "plain_guesses": speculation(0.2, 0.1),
            "speedup_gated": 1.21, "gated": {**speculation(0.1, 0.05), "guess_thresholds": [0.4, 0.4]}}


def data_paths_report() -> dict:
    rows = []
    for ms, lockstep, ring in ((0.0, 130.0, 150.0), (5.0, 60.0, 110.0), (20.0, 20.0, 55.0)):
        rows.append({"emulated_link_ms": ms,
                     "lockstep": {"sequential_tokens_per_s": lockstep * 0.8, "speculative_tokens_per_s": lockstep,
                                  **speculation(0.14, 0.07)},
                     "ring": {"sequential_tokens_per_s": ring * 0.7, "speculative_tokens_per_s": ring,
                              **speculation(0.15, 0.08)},
                     "single_process_tokens_per_s": 510.0,
                     "ring_over_lockstep_speculative": round(ring / lockstep, 2),
                     "ring_speculative_over_single_process": round(ring / 510.0, 2)})
    return {"cluster": "local", "bundle": "demo-4x3", "nodes": 3, "window": 8, "temperature": 0.0, "new_tokens": 64,
            "runs": 4, "rows": rows}


HEADER = {"cluster": "local", "bundle": "demo-4x3", "nodes": 3, "temperature": 0.0}
MEMORY = {name: {"before": 80.0, "peak": 95.5, "after": 82.1} for name in ("coordinator", "edge-1", "edge-2", "edge-3")}


def load_report_of(clients: int = 32, *, failed: bool = False) -> dict:
    if failed:
        return load_report(HEADER, clients, 1, 48, (Tally(errors=["e1"]), 1.0), (Tally(errors=["e2"]), 1.0), {})
    one = (Tally(latencies_s=[0.4, 0.41, 0.39], tokens=144), 1.2)
    many = (Tally(latencies_s=[0.5 + 0.01 * i for i in range(clients * 3)], tokens=144 * clients), 2.0 * clients / 8)
    return load_report(HEADER, clients, 3, 48, one, many, MEMORY)


def chaos_report_of(trials: int = 6) -> dict:
    results = [{"trial": i, "sampling": "greedy" if i % 2 == 0 else "sampled", "victim": f"edge-{i % 3 + 1}",
                "kill_after_chunk": 3, "killed_mid_request": i != 4, "identical": i != 2,
                "error": "Unavailable: node edge-3 stopped answering" if i == 2 else None,
                "next_chunk_ms": None if i == 4 else 120.0 + 10 * i, "longest_gap_ms": None if i == 4 else 300.0 + i,
                "recovery_s": 1.5 + 0.1 * i} for i in range(trials)]
    return chaos_report(HEADER, 48, 0, results)


def agreement_report() -> dict:
    return {"bundle": "smollm2-135m-int4", "source": "smollm2-135m", "prompts": 20, "new_tokens": 64,
            "identical_sequences": 7, "tokens_before_first_difference": {"mean": 31.4, "median": 26.5},
            "agreeing_fraction": 0.491,
            "held_out_loss": {"bundle": 3.0412, "source": 2.9876, "windows": 8, "tokens_per_window": 128}}


def cpu_report() -> dict:
    """What `speed bench FILE --cpu` returns, from its own arithmetic over made-up measurements."""
    from runtime.bench.cpu import figures

    def case(path: str, mode: str, temperature: float, busiest_ms: float) -> dict:
        per_token = {"coordinator": 0.5e-3, "edge-1": busiest_ms / 1e3, "edge-2": 1.2e-3}
        for name, cpu in (("edge-1", busiest_ms / 1e3), ("edge-2", 1.2e-3)):
            per_token |= {(name, "process_cpu_s"): cpu, (name, "worker_cpu_s"): cpu * 0.7, (name, "stage_s"): cpu * 0.4,
                          (name, "stage_calls"): 1.3, (name, "stage_positions"): 1.3, (name, "exit_s"): 0.0,
                          (name, "guess_s"): cpu * 0.1, (name, "commit_s"): 0.0, (name, "serialize_s"): cpu * 0.05}
        measured = {"per_token": per_token, "nodes": ["edge-1", "edge-2"], "hosting": {"edge-1": 1, "edge-2": 1},
                    "tokens_per_s": 250.0}
        return {"data_path": path, "temperature": temperature, "mode": mode,
                **figures(measured, {"cpu_ms_per_token": 1.5, "tokens_per_s": 600.0}, node_count=2)}

    return {"cluster": "local", "bundle": "demo-4x3", "nodes": 2, "window": 8, "new_tokens": [32, 128], "prompts": 4,
            "repeats": 1, "single_process": {"0.0": {"cpu_ms_per_token": 1.5, "tokens_per_s": 600.0}},
            "stage_call_one_process_ms": 0.4,
            "cases": [case(path, mode, 0.0, ms) for path, mode, ms in
                      (("lockstep", "sequential", 1.6), ("lockstep", "speculative", 1.9), ("ring", "sequential", 1.7),
                       ("ring", "speculative", 1.8))]}


REPORTS = {
    "cpu": cpu_report,
    "reference": reference_report,
    "local": local_report,
    "cluster": cluster_report,
    "data_paths": data_paths_report,
    "load": load_report_of,
    "chaos": chaos_report_of,
    "agreement": agreement_report,
}


def assert_figure(path: Path) -> None:
    """A whole image file of its suffix; a PNG that matplotlib reads back as pixels."""
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(MAGIC[path.suffix])
    if path.suffix == ".png":
        import matplotlib.image

        height, width, channels = matplotlib.image.imread(path).shape
        assert width > height > 300 and channels in (3, 4)
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def speed(capsys, *args: str) -> tuple[int, str, str]:
    """`speed ARGS` in this process: exit status, stdout, stderr."""
    try:
        status = main(list(args))
    except SystemExit as exc:  # usage errors, from argparse
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- the figures ----

@pytest.mark.parametrize("kind", REPORTS)
def test_every_kind_of_report_is_recognised_and_drawn_as_png(tmp_path, kind):
    report = REPORTS[kind]()
    assert report_kind(report) == kind
    plot_bench(report, tmp_path / "figure.png")
    assert_figure(tmp_path / "figure.png")


@pytest.mark.parametrize("report", [local_report(gated=False), load_report_of(1), load_report_of(failed=True),
                                    chaos_report_of(40), {**reference_report(), "onnx_over_torch": None,
                                    "tokens_per_s": {k: v for k, v in reference_report()["tokens_per_s"].items()
                                                     if k != "torch"}}],
                         ids=["local-ungated", "load-one-client", "load-all-failed", "chaos-40-trials", "quantized"])
def test_optional_and_missing_figures_still_draw(tmp_path, report):
    plot_bench(report, tmp_path / "figure.png")
    assert_figure(tmp_path / "figure.png")


@pytest.mark.parametrize("suffix", [".svg", ".pdf"])
def test_svg_and_pdf_are_written_in_their_format(tmp_path, suffix):
    plot_bench(data_paths_report(), tmp_path / f"figure{suffix}")
    assert_figure(tmp_path / f"figure{suffix}")


def test_a_failed_write_leaves_the_old_figure_and_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "figure.png"
    path.write_bytes(b"the old figure")

    def half_written(self, out, **options):
        out.write(PNG_MAGIC)
        raise OSError("No space left on device")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(SpeedError, match=f"cannot write {path} \\(No space left on device\\); free some space"):
        plot_bench(local_report(), path)
    assert path.read_bytes() == b"the old figure" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_a_report_without_a_figure_it_needs_is_refused_in_one_sentence(tmp_path):
    report = local_report()
    del report["speedup"]
    with pytest.raises(SpeedError, match="the local report lacks a figure .*KeyError: 'speedup'"):
        plot_bench(report, tmp_path / "figure.png")
    with pytest.raises(SpeedError, match="is not a report of `speed bench`"):
        report_kind({"something": 1})
    assert list(tmp_path.iterdir()) == []


# ---- the command line ----

def test_plot_from_a_saved_report_writes_the_figure(tmp_path, capsys):
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(cluster_report()))
    status, out, err = speed(capsys, "bench", "--plot-from", str(saved), "--plot", str(tmp_path / "cluster.png"))
    assert status == 0, err
    assert out == f"wrote figure {tmp_path / 'cluster.png'}\n"
    assert_figure(tmp_path / "cluster.png")


def test_a_real_local_bench_plots_and_its_json_plots_again(tmp_path, capsys):
    """The shipped demo model, 4 tokens: the figure of the run, then the same from the JSON it printed."""
    status, out, err = speed(capsys, "bench", "--local", "--new-tokens", "4", "--repeats", "1", "--json",
                             "--plot", str(tmp_path / "run.png"))
    assert status == 0, err
    assert err == f"wrote figure {tmp_path / 'run.png'}\n"  # stdout stays one JSON object
    report = json.loads(out)
    assert_figure(tmp_path / "run.png")
    (tmp_path / "run.json").write_text(out)
    status, _, err = speed(capsys, "bench", "--plot-from", str(tmp_path / "run.json"), "--plot",
                           str(tmp_path / "again.png"))
    assert status == 0, err
    assert report_kind(report) == "local"
    assert_figure(tmp_path / "again.png")


@pytest.mark.parametrize(("name", "fragment"), [
    ("figure.jpg", "does not end in .png, .svg or .pdf; give a file name with one of these"),
    ("figure", "does not end in .png, .svg or .pdf"),
    ("missing/figure.png", "folder {tmp}/missing of figure.png does not exist; create it or give another path"),
    ("folder.png", "{tmp}/folder.png is a folder; give the name of a file to write"),
])
def test_a_bad_plot_path_is_a_usage_error_before_the_run(tmp_path, capsys, name, fragment):
    (tmp_path / "folder.png").mkdir()
    status, out, err = speed(capsys, "bench", "--local", "--plot", str(tmp_path / name))
    assert status == 2 and out == ""
    line = one_line(err)
    assert line.startswith("speed bench: error: argument --plot: ") and fragment.format(tmp=tmp_path) in line
    assert [p.name for p in tmp_path.iterdir()] == ["folder.png"]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--plot-from", "{tmp}/result.json"], "--plot-from needs --plot FILE"),
    (["--plot-from", "{tmp}/result.json", "--local", "--plot", "{tmp}/f.png"], "--plot-from draws a saved report"),
    (["deploy/local.yaml", "--plot-from", "{tmp}/result.json", "--plot", "{tmp}/f.png"], "--plot-from draws a saved"),
    (["--plot-from", "{tmp}/absent.json", "--plot", "{tmp}/f.png"], "absent.json does not exist"),
    (["--plot-from", "{tmp}/text.json", "--plot", "{tmp}/f.png"], "text.json is not JSON"),
    (["--plot-from", "{tmp}/other.json", "--plot", "{tmp}/f.png"], "other.json is not a report of `speed bench`"),
    (["--plot-from", "{tmp}/broken.json", "--plot", "{tmp}/f.png"], "the cluster report lacks a figure"),
])
def test_plot_from_mistakes_get_one_sentence_and_write_nothing(tmp_path, capsys, args, fragment):
    (tmp_path / "result.json").write_text(json.dumps(local_report()))
    (tmp_path / "text.json").write_text("speedup 1.28x")
    (tmp_path / "other.json").write_text('{"token_ids": [1, 2]}')
    (tmp_path / "broken.json").write_text(json.dumps({**cluster_report(), "nodes": None, "speedup": "fast"}))
    before = sorted(p.name for p in tmp_path.iterdir())
    status, out, err = speed(capsys, "bench", *(arg.format(tmp=tmp_path) for arg in args))
    assert status == 1 and out == ""
    line = one_line(err)
    assert line.startswith("speed bench: error: ") and fragment in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # any import of matplotlib now fails
from runtime.cli.main import main
sys.exit(main(["bench", "--local", "--plot", sys.argv[1]]))
"""


def test_without_matplotlib_plot_says_what_to_install_before_the_run(tmp_path):
    result = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB, str(tmp_path / "figure.png")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""  # the benchmark never started
    assert one_line(result.stderr) == f"speed bench: error: {NO_MATPLOTLIB}"
    assert list(tmp_path.iterdir()) == []
