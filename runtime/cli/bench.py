"""`speed bench`: decoding speed in one process, through a local cluster, under load and under node kills."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runtime.cli.arguments import add_threads_flag, add_window_flag, link_ms, number, seed_int, token_count, whole
from runtime.cli.progress import stderr_progress
from runtime.core.cluster_file import DATA_PATHS as DATA_PATH_NAMES
from runtime.core.errors import SpeedError
from runtime.core.limits import MAX_TEMPERATURE


def add_commands(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("bench", help="measure decoding speed")
    p.add_argument("cluster_file", type=Path, nargs="?", metavar="FILE",
                   help="a cluster file: start it here, then sequential vs speculative through the cluster "
                        "(or --clients, --chaos)")
    p.add_argument("--emulate-link-ms", type=link_ms, metavar="MS",
                   help="with FILE: EMULATED one-way latency of every node's link, 0 to 60000 (overrides the file)")
    p.add_argument("--data-paths", type=latencies, metavar="MS,...",
                   help="with FILE: both data paths (lockstep, ring), sequential and speculative, at each of these "
                        "EMULATED one-way link latencies, e.g. 0,5,20")
    p.add_argument("--cpu", type=data_path_list, nargs="?", const=DATA_PATH_NAMES, metavar="PATHS",
                   help="with FILE: CPU time per committed token of the coordinator and of each node against one "
                        "process, where each node's goes, greedy and sampled, sequential and speculative, on these "
                        "data paths (default lockstep,ring)")
    add_window_flag(p)
    p.add_argument("--reference", action="store_true", help="plain decoding: onnx vs torch, context 32 vs 512")
    p.add_argument("--local", action="store_true", help="sequential vs speculative decoding in one process")
    p.add_argument("--agreement", type=Path, metavar="SOURCE",
                   help="greedy tokens and held-out loss of --bundle against the bundle SOURCE it was made from "
                        "(e.g. by speed quantize)")
    p.add_argument("--llama-cpp", type=Path, metavar="GGUF",
                   help="llama.cpp on the GGUF file --bundle was imported from, in the same run (needs "
                        "llama-cpp-python installed beside the runtime): alone, tokens/s of both on the same prompt "
                        "token ids; with --agreement, also each bundle's greedy agreement with llama.cpp's tokens")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the shipped demo-4x3 model)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="with --reference or --local: ONNX Runtime's device (cuda: refused in one sentence where it "
                        "cannot really run)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--clients", type=whole(1, 1000), metavar="N",
                      help="with FILE: 1 client against N concurrent clients: tokens/s, latency, errors, memory")
    load.add_argument("--chaos", type=whole(1, 10_000), metavar="N",
                      help="with FILE: N generations, a random node SIGKILLed during each, tokens checked, node restarted")
    p.add_argument("--requests", type=whole(1, 10_000), help="with --clients: requests per client (default 3)")
    p.add_argument("--seed", type=seed_int, help="with --chaos: seed of the random kills (default 0)")
    p.add_argument("--new-tokens", type=token_count,
                   help="tokens per run (default 64 reference, 128 local and FILE, 48 --clients and --chaos)")
    p.add_argument("--repeats", type=whole(1, 1000), default=3)
    p.add_argument("--temperature", type=number(0, MAX_TEMPERATURE, zero="0 = greedy"),
                   help="with --reference, --local, FILE, --clients or --cpu: sample at this temperature (seed 0), not "
                        "greedy (--cpu: only at this one; by default greedy and 0.8)")
    p.add_argument("--guess-threshold", type=number(0, 1, above=True), metavar="P",
                   help="with --local, FILE or --cpu: (also) run speculation behind this confidence gate (default: the "
                        "cluster file's, else the bundle's from `speed calibrate`)")
    add_threads_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", type=plot_path, metavar="FILE",
                   help="also draw what the run measured into FILE (.png, .svg or .pdf; needs the plot extra)")
    p.add_argument("--plot-from", type=Path, metavar="RESULT",
                   help="with --plot: draw a saved --json report instead of running a benchmark")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> None:
    from runtime.bench.local import bench_local, bench_reference, format_local
    from runtime.core.bundle import load_bundle
    from runtime.core.generation import guess_thresholds

    if args.plot is not None:
        from runtime.bench.plot import require_matplotlib

        require_matplotlib()  # before any benchmark runs
    if args.plot_from is not None:
        cmd_plot_from(args)
        return
    if args.requests is not None and args.clients is None:
        raise SpeedError("--requests needs --clients")
    if args.seed is not None and args.chaos is None:
        raise SpeedError("--seed needs --chaos")
    if args.device != "cpu" and not (args.reference or args.local):
        raise SpeedError("--device applies to --reference and --local; a cluster file names each node's device")
    if args.cluster_file is not None:
        if args.reference or args.local:
            raise SpeedError("give either a cluster FILE or one of --reference and --local, not both")
        cmd_bench_cluster(args)
        return
    for flag, value in [("--clients", args.clients), ("--chaos", args.chaos), ("--emulate-link-ms", args.emulate_link_ms),
                        ("--data-paths", args.data_paths), ("--window", args.window), ("--cpu", args.cpu)]:
        if value is not None:
            raise SpeedError(f"{flag} needs a cluster FILE")
    if args.temperature and (args.agreement is not None or args.chaos is not None):
        raise SpeedError("--temperature applies to --reference, --local, a cluster FILE and --clients (--agreement "
                         "compares greedy tokens; --chaos samples every other trial)")
    if args.agreement is not None:
        if args.reference or args.local:
            raise SpeedError("give one of --agreement, --reference and --local")
        cmd_bench_agreement(args)
        return
    if args.llama_cpp is not None:
        if args.reference or args.local or args.temperature:
            raise SpeedError("--llama-cpp compares greedy decoding in one process; drop --reference, --local and "
                             "--temperature")
        cmd_bench_llama_cpp(args)
        return
    if args.reference == args.local:
        raise SpeedError("choose one of a cluster FILE (through a local cluster), --reference (plain decoding: onnx "
                         "vs torch, short vs long context), --local (sequential vs speculative in one process) and "
                         "--agreement SOURCE (greedy tokens against another bundle), and --llama-cpp GGUF (tokens/s "
                         "against llama.cpp)")
    if args.guess_threshold is not None and not args.local:
        raise SpeedError("--guess-threshold applies to --local and a cluster FILE's speculative runs")
    if args.local:
        bundle = load_bundle(args.bundle)
        thresholds = guess_thresholds((args.guess_threshold,), bundle.guess_thresholds, bundle.config.n_stages)
        report = bench_local(bundle, new_tokens=args.new_tokens or 128, repeats=args.repeats, threads=args.threads,
                             device=args.device, sampling=bench_sampling(args), guess_thresholds=thresholds,
                             progress=stderr_progress(json_output=args.json))
        print(json.dumps(report) if args.json else format_local(report))
        draw(args, report)
        return
    report = bench_reference(load_bundle(args.bundle), new_tokens=args.new_tokens or 64, repeats=args.repeats,
                             threads=args.threads, device=args.device, sampling=bench_sampling(args),
                             progress=stderr_progress(json_output=args.json))
    if args.json:
        print(json.dumps(report))
        draw(args, report)
        return
    rates = report["tokens_per_s"]
    print(f"plain greedy decoding of {report['bundle']} ({report['bundle_bytes'] / 1e6:.1f} MB), "
          f"{report['new_tokens']} new tokens, {report['threads']} thread(s) on {report['provider']}, "
          f"median of {report['repeats']} alternating runs (tokens/s)")
    torch = (f"   torch {rates['torch']:8.1f}   onnx/torch {report['onnx_over_torch']:.2f}x" if "torch" in rates
             else "   (no torch twin: a quantized bundle, or torch is not installed)")
    print(f"  onnx  {rates['onnx']:8.1f}{torch}")
    print(f"  onnx at 32 tokens of context {rates['context_32']:8.1f}   at 512 {rates['context_512']:8.1f}   "
          f"ratio {report['context_512_over_32']:.2f}")
    print(f"  onnx with 1 thread {rates['threads_1']:8.1f}   with 2 threads {rates['threads_2']:8.1f}")
    draw(args, report)


def cmd_bench_agreement(args: argparse.Namespace) -> None:
    from runtime.bench.agreement import bench_agreement, format_agreement
    from runtime.core.bundle import load_bundle

    if args.bundle is None:
        raise SpeedError("--agreement SOURCE needs --bundle, the bundle to compare with SOURCE")
    report = bench_agreement(load_bundle(args.bundle), load_bundle(args.agreement), new_tokens=args.new_tokens or 64,
                             threads=args.threads, llama_cpp=args.llama_cpp,
                             progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_agreement(report))
    draw(args, report)


def cmd_bench_llama_cpp(args: argparse.Namespace) -> None:
    from runtime.bench.llama_cpp import bench_llama_cpp, format_llama_cpp
    from runtime.core.bundle import load_bundle

    if args.bundle is None:
        raise SpeedError("--llama-cpp GGUF needs --bundle, the bundle imported from GGUF")
    if args.plot is not None:
        raise SpeedError("--llama-cpp prints its figures; it draws no plot")
    report = bench_llama_cpp(load_bundle(args.bundle), args.llama_cpp, new_tokens=args.new_tokens or 128,
                             repeats=args.repeats, threads=args.threads, progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_llama_cpp(report))


def plot_path(text: str) -> Path:
    """An argparse type: a figure file that can be written (.png, .svg or .pdf in a folder that exists)."""
    from runtime.bench.plot import check_plot_path

    path = Path(text)
    try:
        check_plot_path(path)
    except SpeedError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def draw(args: argparse.Namespace, report: dict) -> None:
    """--plot: the figure of a report, once the report is printed (a note on stderr keeps --json output one object)."""
    if args.plot is None:
        return
    from runtime.bench.plot import plot_bench

    plot_bench(report, args.plot)
    print(f"wrote figure {args.plot}", file=sys.stderr if args.json else sys.stdout)


def cmd_plot_from(args: argparse.Namespace) -> None:
    from runtime.bench.plot import read_report

    if args.plot is None:
        raise SpeedError("--plot-from needs --plot FILE, the figure to draw")
    if args.cluster_file is not None or args.reference or args.local or args.agreement is not None:
        raise SpeedError("--plot-from draws a saved report without running a benchmark; drop the cluster FILE, "
                         "--reference, --local and --agreement")
    draw(args, read_report(args.plot_from))


def bench_sampling(args: argparse.Namespace):
    from runtime.core.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature or 0.0)


def latencies(text: str) -> tuple[float, ...]:
    """"0,5,20" -> (0.0, 5.0, 20.0), each a valid EMULATED link latency."""
    try:
        return tuple(link_ms(part) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"give latencies in ms separated by commas, e.g. 0,5,20 ({exc})") from None


def cmd_bench_cluster(args: argparse.Namespace) -> None:
    from runtime.bench.cluster import bench_cluster, format_cluster

    if (args.clients is not None or args.chaos is not None) and args.guess_threshold is not None:
        raise SpeedError("--guess-threshold applies to --local and a cluster FILE's speculative runs")
    if (args.clients is not None or args.chaos is not None) and args.data_paths is not None:
        raise SpeedError("--data-paths is a benchmark of its own; drop --clients and --chaos")
    if args.cpu is not None:
        cmd_bench_cpu(args)
        return
    if args.clients is not None:
        cmd_bench_load(args)
        return
    if args.chaos is not None:
        cmd_bench_chaos(args)
        return
    if args.data_paths is not None:
        cmd_bench_data_paths(args)
        return
    if args.window is not None:
        raise SpeedError("--window applies to --data-paths (set speculation.window in the cluster file otherwise)")
    report = bench_cluster(args.cluster_file, new_tokens=args.new_tokens or 128, repeats=args.repeats,
                           emulated_link_ms=args.emulate_link_ms, sampling=bench_sampling(args),
                           guess_threshold=args.guess_threshold, progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_cluster(report))
    draw(args, report)


def cmd_bench_data_paths(args: argparse.Namespace) -> None:
    from runtime.bench.data_paths import bench_data_paths, format_data_paths

    if args.emulate_link_ms is not None or args.guess_threshold is not None:
        raise SpeedError("--data-paths sets the link latencies itself and sends every guess; drop --emulate-link-ms "
                         "and --guess-threshold")
    report = bench_data_paths(args.cluster_file, link_ms=args.data_paths, new_tokens=args.new_tokens or 64,
                              repeats=args.repeats, sampling=bench_sampling(args), window=args.window,
                              progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_data_paths(report))
    draw(args, report)


def cmd_bench_cpu(args: argparse.Namespace) -> None:
    from runtime.bench.cpu import SAMPLED_TEMPERATURE, bench_cpu, format_cpu

    for flag, value in [("--clients", args.clients), ("--chaos", args.chaos), ("--data-paths", args.data_paths),
                        ("--emulate-link-ms", args.emulate_link_ms)]:
        if value is not None:
            raise SpeedError(f"--cpu is a benchmark of its own at the file's link latencies; drop {flag}")
    temperatures = (0.0, SAMPLED_TEMPERATURE) if args.temperature is None else (args.temperature,)
    report = bench_cpu(args.cluster_file, data_paths=args.cpu, temperatures=temperatures,
                       new_tokens=args.new_tokens or 128, repeats=args.repeats, window=args.window,
                       guess_threshold=args.guess_threshold, progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_cpu(report))
    draw(args, report)


def data_path_list(text: str) -> tuple[str, ...]:
    """"ring" or "lockstep,ring" -> the data paths named, each once."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    unknown = [name for name in names if name not in DATA_PATH_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"give data paths separated by commas, from {', '.join(DATA_PATH_NAMES)}; "
                                         f"got {text!r}")
    return names


def cmd_bench_load(args: argparse.Namespace) -> None:
    from runtime.bench.load import bench_load, format_load

    report = bench_load(args.cluster_file, clients=args.clients, requests=args.requests or 3,
                        new_tokens=args.new_tokens or 48, emulated_link_ms=args.emulate_link_ms,
                        sampling=bench_sampling(args), progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_load(report))
    draw(args, report)


def cmd_bench_chaos(args: argparse.Namespace) -> None:
    from runtime.bench.load import bench_chaos, format_chaos

    report = bench_chaos(args.cluster_file, trials=args.chaos, new_tokens=args.new_tokens or 48, seed=args.seed or 0,
                         emulated_link_ms=args.emulate_link_ms, progress=stderr_progress(json_output=args.json))
    print(json.dumps(report) if args.json else format_chaos(report))
    draw(args, report)
