"""`speed bench ... --plot FILE`: one figure of what a benchmark measured, drawn from the report the
benchmark returns (the object --json prints), so that a saved report draws again with --plot-from.

A report's kind is told by a key only that kind has; the figure has one panel per thing measured:
tokens/s of each mode with the speed-ups the report gives, flip rates per stage boundary, latency
percentiles and memory under load, failover times under chaos, tokens/s against EMULATED link
latency for --data-paths. matplotlib (the plot extra) is imported only to draw, onto the Agg canvas:
no screen is needed. The file is written whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
from pathlib import Path

from runtime.core.errors import SpeedError

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
DPI = 150
PANEL_SIZE = (5.2, 4.2)  # inches per panel: width, height
TITLE_WIDTH = 0.95  # the widest a title line may be, as a fraction of the figure's width

# kind -> the key only its reports have, tried in this order
KINDS = {
    "cpu": "cases",
    "data_paths": "rows",
    "chaos": "results",
    "load": "clients_tokens_per_s",
    "agreement": "held_out_loss",
    "reference": "context_512_over_32",
    "cluster": "sequential_over_reference",
    "local": "pass_cost_us",
}

# one colour per mode, the same in every figure
COLOURS = {"single process": "#7f7f7f", "sequential": "#1f77b4", "speculative": "#ff7f0e",
           "without exits": "#2ca02c", "gated": "#9467bd"}
CHAOS_LABELLED_TRIALS = 12  # beyond this many trials, values on the bars would overlap
PERCENTILE_KEY = re.compile(r"^(latency|first_token)_p(\d+)_s$")  # latency_p50_s, first_token_p99_s


# ---- where the figure goes, what draws it ----

def check_plot_path(path: Path) -> None:
    """Refuse, before any benchmark runs, a figure path that could not be written."""
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise SpeedError(f"{path} does not end in .png, .svg or .pdf; give a file name with one of these")
    if not path.parent.is_dir():
        raise SpeedError(f"folder {path.parent} of {path.name} does not exist; create it or give another path")
    if path.is_dir():
        raise SpeedError(f"{path} is a folder; give the name of a file to write")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise SpeedError(f"folder {path.parent} is not writable; give a path in a folder you can write")


def require_matplotlib() -> None:
    """Raises ModuleNotFoundError (name 'matplotlib') when the plot extra is missing."""
    import matplotlib  # noqa: F401


def read_report(path: Path) -> dict:
    """The report a `speed bench ... --json` run printed, saved to a file."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpeedError(f"{path} does not exist; give the saved output of `speed bench ... --json`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpeedError(f"cannot read {path} ({exc}); give a readable JSON file") from None
    except json.JSONDecodeError as exc:
        raise SpeedError(f"{path} is not JSON ({exc}); give the output of `speed bench ... --json`") from None
    report_kind(report, source=path)
    return report


def report_kind(report: object, *, source: Path | str = "the report") -> str:
    if isinstance(report, dict):
        for kind, key in KINDS.items():
            if key in report:
                return kind
    raise SpeedError(f"{source} is not a report of `speed bench` (none of the keys {', '.join(KINDS.values())}); "
                     "give the output of `speed bench ... --json`")


def plot_bench(report: dict, path: Path) -> None:
    """Draw the report into path (.png, .svg or .pdf): a temporary file in the same folder, renamed when whole."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    kind = report_kind(report)
    draw, title = DRAWERS[kind]
    fig = Figure(layout="constrained")
    FigureCanvasAgg(fig)
    try:
        draw(fig, report)
        fitted_title(fig, title(report))
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise SpeedError(f"the {kind.replace('_', '-')} report lacks a figure or has one of the wrong type "
                         f"({type(exc).__name__}: {exc}); give the output of `speed bench ... --json` unchanged") from None
    try:
        save_atomically(fig, path)
    except OSError as exc:
        raise SpeedError(f"cannot write {path} ({exc.strerror or exc}); free some space or give another path") from None


def fitted_title(fig, text: str) -> None:
    """The title on one line, or on as few lines of even length as fit the figure's width."""
    title = fig.suptitle(text, fontsize=11)
    overflow = title.get_window_extent(fig.canvas.get_renderer()).width / (fig.get_figwidth() * fig.dpi * TITLE_WIDTH)
    if overflow > 1:
        lines = math.ceil(overflow)
        width = math.ceil(len(text) / lines)
        while len(textwrap.wrap(text, width)) > lines:
            width += 1
        title.set_text(textwrap.fill(text, width))


def save_atomically(fig, path: Path) -> None:
    """Whole or not at all: a reader never sees part of a figure, and a failed write leaves no file behind."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out:
            fig.savefig(out, format=path.suffix.lower()[1:], dpi=DPI)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; a figure is for others to read
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---- panels shared by several kinds ----

def panels(fig, count: int, **options) -> list:
    fig.set_size_inches(PANEL_SIZE[0] * count, PANEL_SIZE[1])
    return list(fig.subplots(1, count, squeeze=False, **options)[0])


def rate_bars(ax, bars: list[tuple[str, float, str]], ylabel: str = "tokens/s", digits: int = 1,
              labelled: bool = True, colours: list[str] | None = None) -> None:
    """One bar per (mode, value, note): each labelled with its value and, under it, the note (a speed-up);
    a mode's colour is its own in every figure unless colours are given."""
    names = [name for name, _, _ in bars]
    container = ax.bar(range(len(bars)), [value for _, value, _ in bars],
                       color=colours or [COLOURS.get(name, "C0") for name in names])
    if labelled:
        ax.bar_label(container, labels=[f"{value:.{digits}f}" + (f"\n{textwrap.fill(note, 11)}" if note else "")
                                        for _, value, note in bars], padding=2, fontsize=9)
    ax.set_xticks(range(len(bars)), [textwrap.fill(name, 14) for name in names], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.22)
    ax.set_ylim(bottom=0)


def flip_bars(ax, series: dict[str, list[float]]) -> None:
    """Flip rate per stage boundary, one bar per mode at each boundary."""
    from matplotlib.ticker import PercentFormatter

    boundaries = max(len(rates) for rates in series.values())
    width = 0.8 / len(series)
    for i, (mode, rates) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        container = ax.bar([b + offset for b in range(len(rates))], rates, width, label=mode, color=COLOURS.get(mode))
        ax.bar_label(container, labels=[f"{rate:.1%}" for rate in rates], padding=2, fontsize=8)
    ax.set_xticks(range(boundaries), [f"stage {b + 1} -> {b + 2}" for b in range(boundaries)])
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("flip rate (guesses changed by the next stage)")
    ax.set_xlabel("stage boundary")
    ax.set_title("flips per boundary", fontsize=10)
    ax.margins(y=0.2)
    ax.set_ylim(bottom=0)
    if len(series) > 1:
        ax.legend(fontsize=8)


def grouped_bars(ax, groups: list[str], series: dict[str, list[float | None]], unit: str, digits: int,
                 labelled: bool = True) -> None:
    """At each group, one bar per series; a missing value (None) is left out."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        offset = (i - (len(series) - 1) / 2) * width
        present = [(g, v) for g, v in enumerate(values) if v is not None]
        container = ax.bar([g + offset for g, _ in present], [v for _, v in present], width, label=name, color=f"C{i}")
        if labelled:
            ax.bar_label(container, labels=[f"{v:.{digits}f}" for _, v in present], padding=2, fontsize=8)
    ax.set_xticks(range(len(groups)), groups, fontsize=9)
    ax.set_ylabel(unit)
    ax.margins(y=0.3)  # room for the legend above the tallest bar
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, ncols=len(series), loc="upper center")


def sampled(report: dict) -> str:
    temperature = report.get("temperature") or 0
    return f"sampled at temperature {temperature:g}" if temperature else "greedy"


def cluster_name(report: dict) -> str:
    return f"cluster {report['cluster']} ({report['bundle']}, {report['nodes']} nodes)"


# ---- one function per kind of report ----

def draw_reference(fig, report: dict) -> None:
    rates = report["tokens_per_s"]
    backend, context, threads = panels(fig, 3, sharey=True)
    torch_ratio = report.get("onnx_over_torch")
    rate_bars(backend, [("onnx", rates["onnx"], f"{torch_ratio:.2f}x torch" if torch_ratio else "")]
              + ([("torch", rates["torch"], "")] if "torch" in rates else []))
    backend.set_title("backend" + ("" if "torch" in rates else " (quantized: no torch twin)"), fontsize=10)
    rate_bars(context, [("32 tokens", rates["context_32"], ""),
                        ("512 tokens", rates["context_512"], f"{report['context_512_over_32']:.2f}x 32 tokens")], "")
    context.set_title("context (onnx)", fontsize=10)
    rate_bars(threads, [("1 thread", rates["threads_1"], ""), ("2 threads", rates["threads_2"], "")], "")
    threads.set_title("intra-op threads (onnx)", fontsize=10)


def title_reference(report: dict) -> str:
    return (f"plain decoding of {report['bundle']} ({report['bundle_bytes'] / 1e6:.1f} MB): {report['new_tokens']} "
            f"new tokens, {report['threads']} thread(s), {sampled(report)}, median of {report['repeats']} alternating runs")


def draw_local(fig, report: dict) -> None:
    rates, flips = panels(fig, 2)
    bars = [("sequential", report["sequential_tokens_per_s"], ""),
            ("speculative", report["speculative_tokens_per_s"], f"{report['speedup']:.2f}x")]
    series = {"speculative": report["flips_per_boundary"]}
    if "gated" in report:
        gated = report["gated"]
        bars.append(("gated", gated["tokens_per_s"], f"{gated['speedup']:.2f}x"))
        series["gated"] = gated["flips_per_boundary"]
    rate_bars(rates, bars)
    rates.set_title(f"speed-up against sequential; the cost model predicts {report['predicted_speedup']:.2f}x",
                    fontsize=10)
    flip_bars(flips, series)


def title_local(report: dict) -> str:
    return (f"sequential vs speculative decoding of {report['bundle']} in one process: {report['new_tokens']} new "
            f"tokens, {sampled(report)}, median of {report['runs']} alternating runs")


def draw_cluster(fig, report: dict) -> None:
    rates, flips = panels(fig, 2)
    bars = [("single process", report["reference_tokens_per_s"], ""),
            ("sequential", report["sequential_tokens_per_s"], f"{report['sequential_over_reference']:.2f}x single"),
            ("speculative", report["speculative_tokens_per_s"], f"{report['speedup']:.2f}x sequential")]
    series = {"speculative": report["flips_per_boundary"]}
    for mode, key, suffix in (("without exits", "speculative_plain_guesses", "plain_guesses"),
                              ("gated", "gated", "gated")):
        if suffix in report:
            bars.append((mode, report[f"{key}_tokens_per_s"], f"{report[f'speedup_{suffix}']:.2f}x sequential"))
            series[mode] = report[suffix]["flips_per_boundary"]
    rate_bars(rates, bars)
    rates.set_title("through the cluster, beside plain decoding in one process", fontsize=10)
    flip_bars(flips, series)


def link_latency(report: dict) -> str:
    links = sorted(set(report["emulated_link_ms"].values()))
    return "no emulated latency" if links == [0] else f"EMULATED link {', '.join(f'{ms:g}' for ms in links)} ms"


def title_cluster(report: dict) -> str:
    return (f"{cluster_name(report)}, {link_latency(report)}: {report['new_tokens']} new tokens, {sampled(report)}, "
            f"median of {report['runs']} alternating runs")


DATA_PATH_LINES = (  # label, path (None: the single process), mode key, line style
    ("single process", None, "single_process_tokens_per_s", ":"),
    ("lockstep sequential", "lockstep", "sequential_tokens_per_s", "--"),
    ("lockstep speculative", "lockstep", "speculative_tokens_per_s", "--"),
    ("ring sequential", "ring", "sequential_tokens_per_s", "-"),
    ("ring speculative", "ring", "speculative_tokens_per_s", "-"),
)


def draw_data_paths(fig, report: dict) -> None:
    rows = report["rows"]
    rates, flips = panels(fig, 2)
    link = [row["emulated_link_ms"] for row in rows]
    for label, path, key, style in DATA_PATH_LINES:
        values = [row[key] if path is None else row[path][key] for row in rows]
        rates.plot(link, values, style, marker="o", label=label, color=COLOURS[label.split()[-1]]
                   if path else COLOURS["single process"])
    for ms, row in zip(link, rows):  # the ratio the report gives, at the ring's speculative point
        rates.annotate(f"{row['ring_over_lockstep_speculative']:.2f}x", (ms, row["ring"]["speculative_tokens_per_s"]),
                       textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    rates.set_xlabel("EMULATED one-way link latency (ms)")
    rates.set_ylabel("tokens/s")
    rates.set_title("tokens/s; labels: ring over lockstep, speculative", fontsize=10)
    rates.set_xticks(link)
    rates.margins(x=0.08, y=0.15)
    rates.set_ylim(bottom=0)
    rates.legend(fontsize=8)
    draw_flips_by_latency(flips, link, rows)


def draw_flips_by_latency(ax, link: list[float], rows: list[dict]) -> None:
    from matplotlib.ticker import PercentFormatter

    for path, style in (("lockstep", "--"), ("ring", "-")):
        boundaries = len(rows[0][path]["flips_per_boundary"])
        for b in range(boundaries):
            ax.plot(link, [row[path]["flips_per_boundary"][b] for row in rows], style, marker="o",
                    label=f"{path}, stage {b + 1} -> {b + 2}", color=f"C{b + 2}")
    ax.set_xlabel("EMULATED one-way link latency (ms)")
    ax.set_ylabel("flip rate (guesses changed by the next stage)")
    ax.set_title("speculative: flips per boundary", fontsize=10)
    ax.set_xticks(link)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.margins(y=0.15)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def title_data_paths(report: dict) -> str:
    return (f"{cluster_name(report)}, lockstep and ring data paths: {report['new_tokens']} new tokens, "
            f"{sampled(report)}, ring window {report['window']}, median of {report['runs']} alternating runs")


def draw_load(fig, report: dict) -> None:
    rates, latency, memory = panels(fig, 3)
    scaling = report["scaling"]
    rate_bars(rates, [("1 client", report["one_client_tokens_per_s"], ""),
                      (f"{report['clients']} clients", report["clients_tokens_per_s"],
                       "" if scaling is None else f"{scaling:.2f}x one client")], "tokens/s (all clients)",
              colours=[COLOURS["sequential"], COLOURS["speculative"]])
    rates.set_title(f"errors: {report['errors']} of {report['requests']} requests", fontsize=10)
    draw_latency(latency, report)
    processes = list(report["rss_mb"])
    grouped_bars(memory, processes, {when: [report["rss_mb"][p][when] for p in processes]
                                     for when in ("before", "peak", "after")}, "resident memory (MB)", 0)
    memory.set_title("memory of every process", fontsize=10)
    memory.tick_params(axis="x", labelrotation=20)


def draw_latency(ax, report: dict) -> None:
    """Every percentile the report holds: per request and, when measured, to the first token."""
    found: dict[str, dict[int, float | None]] = {}
    for key, value in report.items():
        if match := PERCENTILE_KEY.match(key):
            what = "per request" if match[1] == "latency" else "to first token"
            found.setdefault(what, {})[int(match[2])] = value
    percentiles = sorted({q for values in found.values() for q in values})
    grouped_bars(ax, [f"p{q}" for q in percentiles], {what: [values.get(q) for q in percentiles]
                                                     for what, values in found.items()}, "latency (s)", 3)
    clients = report["clients"]
    ax.set_title(f"latency with {clients} concurrent client{'s' if clients != 1 else ''}", fontsize=10)
    if all(value is None for values in found.values() for value in values.values()):
        ax.text(0.5, 0.5, "no request completed", transform=ax.transAxes, ha="center")


def title_load(report: dict) -> str:
    return (f"{cluster_name(report)}: 1 client, then {report['clients']} concurrent clients of "
            f"{report['requests_per_client']} request(s) of {report['new_tokens']} new tokens each, {sampled(report)}, "
            "EOS ignored")


def draw_chaos(fig, report: dict) -> None:
    results = report["results"]
    gaps, recovery = panels(fig, 2)
    trials = [str(r["trial"]) for r in results]
    labelled = len(results) <= CHAOS_LABELLED_TRIALS
    grouped_bars(gaps, trials, {"kill to next chunk": [r["next_chunk_ms"] for r in results],
                                "longest gap after the kill": [r["longest_gap_ms"] for r in results]}, "ms", 1,
                 labelled)
    gaps.set_title(f"failover: median {report['failover_ms_median']} ms, max {report['failover_ms_max']} ms", fontsize=10)
    rate_bars(recovery, [(trial, r["recovery_s"], "") for trial, r in zip(trials, results)],
              "restarted node serving again after (s)", digits=2, labelled=labelled)
    recovery.set_title("recovery of the killed node", fontsize=10)
    every = max(1, len(results) // CHAOS_LABELLED_TRIALS)  # a tick per trial would overlap beyond that
    differing = [i for i, r in enumerate(results) if not r["identical"]]
    for ax in (gaps, recovery):
        ax.set_xticks(range(0, len(trials), every), trials[::every], fontsize=9)
        ax.set_xlabel("trial" + (" (red: tokens not identical to the single process)" if differing else ""))
        for i in differing:
            ax.axvspan(i - 0.5, i + 0.5, color="red", alpha=0.15, linewidth=0)


def title_chaos(report: dict) -> str:
    return (f"{cluster_name(report)}: {report['trials']} generation(s) of {report['new_tokens']} new tokens, a node "
            f"SIGKILLed during each (seed {report['seed']}); completed identical "
            f"{report['completed_identical']} of {report['trials']}")


def draw_agreement(fig, report: dict) -> None:
    tokens, loss = panels(fig, 2)
    before = report["tokens_before_first_difference"]
    rate_bars(tokens, [("mean", before["mean"], ""), ("median", before["median"], "")],
              "tokens before the first difference")
    tokens.axhline(report["new_tokens"], color="black", linestyle=":", linewidth=1)
    tokens.set_title(f"identical to the end: {report['identical_sequences']} of {report['prompts']}; "
                     f"{report['agreeing_fraction']:.1%} of positions agree", fontsize=10)
    held = report["held_out_loss"]
    rate_bars(loss, [(report["bundle"], held["bundle"], f"{held['bundle'] - held['source']:+.4f}"),
                     (report["source"], held["source"], "")], "held-out loss (nats per token)", digits=4)
    loss.set_title(f"over {held['windows']} windows of {held['tokens_per_window']} tokens", fontsize=10)


def title_agreement(report: dict) -> str:
    return (f"{report['bundle']} against {report['source']}: greedy tokens over {report['prompts']} held-out prompts "
            f"x {report['new_tokens']} tokens (dotted: all of them), and held-out loss")


def case_label(case: dict) -> str:
    sampling = "greedy" if not case["temperature"] else f"T={case['temperature']:g}"
    return f"{case['data_path']}\n{sampling}\n{case['mode'][:4]}."


def draw_cpu(fig, report: dict) -> None:
    """The ratios of every case, then where its busiest node's CPU per token goes, part on part."""
    cases = report["cases"]
    ratios, parts = panels(fig, 2)
    fig.set_size_inches(max(PANEL_SIZE[0], 0.9 * len(cases)) * 2, PANEL_SIZE[1] * 1.2)
    labels = [case_label(case) for case in cases]
    grouped_bars(ratios, labels, {"total ratio": [case["total_ratio"] for case in cases],
                                  "node ratio": [case["node_ratio"] for case in cases]}, "x the single process's CPU", 2)
    ratios.axhline(1.0, color="#7f7f7f", linewidth=0.8)
    ratios.set_title("CPU per committed token against one process (1 = its share)", fontsize=10)
    bottoms = [0.0] * len(cases)
    for i, part in enumerate(report_parts(cases)):
        values = [case["breakdown_ms"][case["busiest_node"]].get(part, 0.0) for case in cases]
        parts.bar(range(len(cases)), values, bottom=bottoms, label=part, color=f"C{i}")
        bottoms = [b + v for b, v in zip(bottoms, values)]
    parts.set_xticks(range(len(cases)), labels, fontsize=8)
    parts.set_ylabel("ms of CPU per committed token")
    parts.set_title("the busiest node: where its CPU goes", fontsize=10)
    parts.margins(y=0.1)
    parts.legend(fontsize=7)


def report_parts(cases: list[dict]) -> list[str]:
    return list(dict.fromkeys(part for case in cases for part in case["breakdown_ms"][case["busiest_node"]]))


def title_cpu(report: dict) -> str:
    short, long = report["new_tokens"]
    return (f"{cluster_name(report)}: CPU per committed token, {report['prompts']} prompts decoded to {short} and "
            f"{long} tokens, ring window {report['window']}")


DRAWERS = {
    "cpu": (draw_cpu, title_cpu),
    "reference": (draw_reference, title_reference),
    "local": (draw_local, title_local),
    "cluster": (draw_cluster, title_cluster),
    "data_paths": (draw_data_paths, title_data_paths),
    "load": (draw_load, title_load),
    "chaos": (draw_chaos, title_chaos),
    "agreement": (draw_agreement, title_agreement),
}
