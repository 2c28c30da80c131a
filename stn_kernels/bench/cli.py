"""The command line of the stn_kernels benchmark: ``python -m stn_kernels.bench [--layer NAME]``.

One entry for every layer (and ``--layer augment``: images per second of per-example data
augmentation, its own table, :mod:`stn_kernels.bench.augment`): ``--layer linear`` (the default:
``hyper_linear``), ``conv2d``,
``embedding`` or ``lstm`` (the HyperLSTM stack; ``--lstm [SHAPES]`` is the same as ``--layer lstm
--shapes SHAPES``, default lstm-ptb). Without ``--gpu`` it times the layer's CPU-default providers
at its CPU-default shapes in float32, fwd and fwd+bwd, and prints the table; ``--out DIR`` also
writes results.csv, results.md and speedup.png. ``--host-overhead`` instead times every layer's per-call
host overhead at a tiny shape (:mod:`stn_kernels.bench.host_overhead`). The layers are in :data:`LAYERS`; what is timed
and how is in :mod:`stn_kernels.bench.harness` and each layer's module.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

from . import augment, conv2d, embedding, harness, host_overhead, linear, lstm, price, price_models, stn_step
from .report import MODES, Report, Row, columns_for, legend, machine_info, write_plot

LAYERS: Dict[str, harness.Layer] = {
    "linear": linear.LAYER,
    "conv2d": conv2d.LAYER,
    "embedding": embedding.LAYER,
    "lstm": lstm.LAYER,
}
DEFAULT_LAYER = "linear"


def _parse_list(text: Optional[str], allowed, what: str) -> Optional[List[str]]:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        raise SystemExit(f"stn_kernels.bench: unknown {what} {', '.join(bad)}; expected some of "
                         f"{', '.join(allowed)}")
    return items


def _epilog() -> str:
    lines = []
    for layer in LAYERS.values():
        lines.append(f"--layer {layer.name} ({layer.op}): --shape {layer.shape_format}")
        lines.append(f"  shapes: {', '.join(layer.shapes)}")
        lines.append("  providers:")
        lines += [f"    {p.name:24s} {p.description}" for p in layer.providers.values()]
    return "\n".join(lines)


def _thread_count(text: str) -> int:
    """``--threads``: a whole number of threads, 1 or more (argparse names the option in its error)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, 1 or more, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stn_kernels.bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog())
    ap.add_argument("--gpu", action="store_true", help="run the CUDA suite (errors without CUDA)")
    ap.add_argument("--layer", default=None, choices=tuple(LAYERS) + ("augment",),
                    help=f"the layer to time (default {DEFAULT_LAYER}); its shapes and providers are listed below; "
                         "augment: per-example data augmentation, images per second (its own table)")
    ap.add_argument("--shapes", help="comma list of the layer's shape names (listed below; default: its CPU "
                                     "shapes, or its GPU shapes with --gpu)")
    formats = "; ".join(f"{layer.name}: {layer.shape_format}" for layer in LAYERS.values())
    ap.add_argument("--shape", action="append", default=[], metavar="SHAPE",
                    help=f"a custom shape (repeatable) in the layer's format ({formats}); replaces the default "
                         "shapes unless --shapes is given too")
    ap.add_argument("--dtypes", help="comma list (default: float32 on CPU; bfloat16,float16,float32 with --gpu)")
    ap.add_argument("--modes", help="comma list of fwd, bwd, fwd+bwd (default: fwd,fwd+bwd on CPU; all with --gpu)")
    ap.add_argument("--providers", help="comma list of the layer's providers (listed below; default: per device)")
    ap.add_argument("--compile", action="store_true", help="on CPU, add published+compile")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (default: max-autotune with --gpu, 'default' on CPU)")
    ap.add_argument("--compile-budget", type=float, default=None, metavar="SECONDS",
                    help="stop adding published+compile to new cases once its compile time exceeds this")
    ap.add_argument("--out", help="write results.csv, results.md and speedup.png into this folder")
    ap.add_argument("--threads", type=_thread_count, default=None, metavar="N",
                    help="torch.set_num_threads(N) first, N >= 1 (CPU timings)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke tests)")
    ap.add_argument("--lstm", nargs="?", const="lstm-ptb", default=None, metavar="SHAPES",
                    help="the same as --layer lstm --shapes SHAPES: a comma list of lstm-ptb (B=40, T=70, 2x650, "
                         f"H=7; the default), lstm-tiny or {lstm.SHAPE_FORMAT}")
    ap.add_argument("--stn-step", nargs="?", const="", default=None, metavar="MODELS",
                    help="time the whole STN cycle (STNTrainer.step) eager vs compiled instead of a layer: a comma "
                         f"list of {', '.join(stn_step.SHAPES)} (default: digits-mlp on CPU, alexnet-fc with --gpu)")
    ap.add_argument("--host-overhead", action="store_true",
                    help="per-call time of every layer at a tiny shape (fwd, fwd+bwd, no_grad): ours vs the published "
                         "formulation vs the plain torch layer, one thread unless --threads; with --quick, --out, "
                         "--gpu (see stn_kernels.bench.host_overhead)")
    ap.add_argument("--price", nargs="?", const="", default=None, metavar="MODELS",
                    help="the price of self-tuning: a converted model's training step (and STN cycle) against the "
                         "plain model's, eager and compiled, with the FLOP floor: a comma list of "
                         f"{', '.join(price_models.MODELS)} (default: all); one thread unless --threads; --providers "
                         f"among {', '.join(price.PROVIDERS)} (see stn_kernels.bench.price)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="start no new case after this many seconds; what was measured is still reported")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    """The parsed command line, with ``--lstm SHAPES`` turned into ``--layer lstm --shapes SHAPES``."""
    args = build_parser().parse_args(argv)
    if args.lstm is not None:
        if args.layer not in (None, "lstm"):
            raise SystemExit(f"stn_kernels.bench: --lstm means --layer lstm; it cannot go with --layer {args.layer}")
        if args.shapes is not None:
            raise SystemExit("stn_kernels.bench: give the LSTM shapes either to --lstm or to --shapes, not both")
        args.layer, args.shapes = "lstm", args.lstm
    args.layer = args.layer or DEFAULT_LAYER
    return args


def _run_stn_step(args: argparse.Namespace, device: torch.device) -> List[Row]:
    """``--stn-step``: the STN cycle table (stn_step.md in ``--out``); no layer rows."""
    names = _parse_list(args.stn_step or None, list(stn_step.SHAPES), "STN step model") or (
        ["alexnet-fc"] if device.type == "cuda" else ["digits-mlp"])
    _own_table("the STN cycle, eager vs compiled", stn_step.run(device, names, args.quick), device, args.out,
               "stn_step.md")
    return []


def _own_table(title: str, table: List[str], device: torch.device, out: Optional[str], filename: str) -> None:
    """Prints a mode's own markdown table under the machine's description and writes it to ``out/filename``."""
    lines = [f"# stn_kernels benchmark: {title}", ""] + [f"- {line}" for line in machine_info(device)] + [""]
    text = "\n".join(lines + table) + "\n"
    print(text, flush=True)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, filename), "w", encoding="utf-8") as f:
            f.write(text)


def _run_augment(args: argparse.Namespace, device: torch.device) -> List[Row]:
    """``--layer augment``: images per second of the augmentation providers (augment.md in ``--out``)."""
    try:
        shapes = [augment.parse_shape(s) for s in (_parse_list(args.shapes, list(augment.SHAPES), "shape") or [])]
        shapes += [augment.parse_shape(s) for s in args.shape]
    except ValueError as exc:
        raise SystemExit(f"stn_kernels.bench: {exc}") from None
    providers = _parse_list(args.providers, list(augment.PROVIDERS), "provider")
    table = augment.run(device, shapes or list(augment.SHAPES.values()), args.quick, providers)
    _own_table("per-example data augmentation", table, device, args.out, "augment.md")
    return []


def main(argv=None) -> List[Row]:
    """Run the benchmark for ``argv`` (default: sys.argv[1:]); returns the rows measured."""
    args = parse_args(argv)
    if args.host_overhead:
        host_overhead.run(gpu=args.gpu, threads=args.threads or 1, quick=args.quick, out=args.out)
        return []
    if args.price is not None:
        if args.gpu and not torch.cuda.is_available():
            raise SystemExit("stn_kernels.bench: --price --gpu needs a CUDA device, but torch.cuda.is_available() is "
                             "False here; run it without --gpu for the CPU table")
        names = _parse_list(args.price or None, list(price_models.MODELS), "price model") or list(price_models.MODELS)
        providers = _parse_list(args.providers, list(price.PROVIDERS), "price provider")
        price.run(names, providers, quick=args.quick, out=args.out, threads=args.threads or 1,
                  device=torch.device("cuda", torch.cuda.current_device()) if args.gpu else torch.device("cpu"))
        return []
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit(f"stn_kernels.bench: --gpu needs a CUDA device, but torch.cuda.is_available() is "
                             f"False here (torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                             "Run without --gpu for the CPU suite.")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    gpu = device.type == "cuda"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.stn_step is not None:
        return _run_stn_step(args, device)
    if args.layer == "augment":
        return _run_augment(args, device)
    layer = LAYERS[args.layer]
    try:
        shapes = [layer.parse_shape(s) for s in (_parse_list(args.shapes, list(layer.shapes), "shape") or [])]
        shapes += [layer.parse_shape(s) for s in args.shape]
    except ValueError as exc:
        raise SystemExit(f"stn_kernels.bench: {exc}") from None
    if not shapes:
        shapes = [layer.shapes[n] for n in (layer.gpu_shapes if gpu else layer.cpu_shapes)]
    dtype_names = _parse_list(args.dtypes, list(harness.DTYPES), "dtype") or (
        ["bfloat16", "float16", "float32"] if gpu else ["float32"])
    dtypes = list(dict.fromkeys(harness.DTYPES[d] for d in dtype_names))
    modes = _parse_list(args.modes, list(MODES), "mode") or (list(MODES) if gpu else ["fwd", "fwd+bwd"])
    providers = _parse_list(args.providers, list(layer.providers), "provider")
    if providers is None:
        providers = harness.default_providers(layer, device)
        if args.compile and "published+compile" not in providers:
            providers.insert(providers.index("published") + 1, "published+compile")
    if "published" not in providers:
        providers.insert(0, "published")  # every ratio is taken against it
    cfg = harness.QUICK if args.quick else harness.FULL
    opts = harness.Options(compile_mode=args.compile_mode or ("max-autotune" if gpu else "default"))

    header = [f"stn_kernels benchmark: {layer.op}"] + machine_info(device) + [
        f"run: device {device}, providers {', '.join(providers)}; modes {', '.join(modes)}; "
        f"dtypes {', '.join(harness.dtype_name(d) for d in dtypes)}; compile mode {opts.compile_mode}"
        + ("; quick" if args.quick else "")
        + (f"; time budget {args.time_budget:g} s" if args.time_budget else "")]
    floor = layer.providers.get("floor")
    report = Report(args.out, header, summary=layer.summary,
                    legend_text=legend(floor.description if floor else None, gpu=gpu), columns=columns_for(device))
    compiled = ", ".join(p for p in providers if harness.is_compiled(p))
    if compiled and gpu and harness.uses_cudagraphs(opts.compile_mode):
        report.notes.append(f"{compiled} use CUDA graphs (mode {opts.compile_mode}): each fwd and "
                            "fwd+bwd call starts with torch.compiler.cudagraph_mark_step_begin(); their peak "
                            "memory counts only what the graphs allocate outside their recorded pool")
    if compiled:
        report.notes.append(f"{compiled}: torch._functorch.config.donated_buffer is off so that the "
                            "compiled backward can run with retain_graph=True (bwd mode)")

    start = time.monotonic()
    deadline = start + args.time_budget if args.time_budget else None
    compile_state = {"spent": 0.0, "budget": args.compile_budget}

    class _Stop(BaseException):
        pass

    def on_term(signum, frame):
        raise _Stop()

    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, on_term)
    completed = True
    try:
        # dtype outermost: every shape at the first dtype before any at the next one.
        for dtype in dtypes:
            for shape in shapes:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError
                case = layer.make_case(shape, dtype, device)
                t0 = time.monotonic()
                ok = harness.run_case(case, providers, modes, cfg, opts, report, deadline, compile_state)
                print(f"[bench] {case.label} done in {time.monotonic() - t0:.1f} s "
                      f"(total {time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
                del case
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
                if not ok:
                    raise TimeoutError
    except TimeoutError:
        completed = False
        report.note(f"time budget of {args.time_budget:g} s reached: later cases were not run")
    except (_Stop, KeyboardInterrupt):
        completed = False
        report.note("interrupted (SIGTERM or Ctrl-C): later cases were not run")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        elapsed = time.monotonic() - start
        wall = f"wall time {elapsed:.0f} s" + ("" if completed else " (partial run)")
        report.notes.append(wall)
        if args.out:
            why = write_plot(report.rows, os.path.join(args.out, "speedup.png"), layer.op)
            if why:
                report.notes.append(why)
        report.close()
        print("\n" + report.legend, flush=True)
        for n in report.notes:
            if n != wall:  # said once, in the closing line
                print(f"- {n}")
        written = (f"results in {args.out}: results.csv, results.md, speedup.png" if args.out
                   else "no files written (--out DIR writes results.csv, results.md and speedup.png)")
        print(f"{wall}; {written}", flush=True)
    return report.rows
