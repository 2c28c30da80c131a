"""What a benchmark run writes: rows, the printed and markdown table, results.csv and the plot.

Nothing here knows a layer: a row names its case by a :class:`Shape` (name, B, H, K, N; each
layer says what its K and N are), a layer-specific section at the end of the markdown comes from
the ``summary`` hook a layer passes in (a table of the layer's targets, for instance). The CSV
columns are read back by :func:`stn_kernels.backend_rules.rules_from_results`: keep them.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch

# The timing modes, in report order: fwd (forward with autograd recording), bwd (the backward
# alone: torch.autograd.grad with retain_graph=True on a stored forward) and fwd+bwd.
MODES = ("fwd", "bwd", "fwd+bwd")


class Shape(NamedTuple):
    """The case columns of a row (CSV: case, B, H, K, N); a layer maps its own shape onto them."""

    name: str
    B: int  # examples
    H: int  # hyperparameters
    K: int  # input features (conv: C_in; embedding: number of embeddings)
    N: int  # output features (conv: C_out; embedding: D)


COLUMNS = ("case", "dtype", "mode", "provider", "median ms", "samples", "IQR %", "vs published", "vs floor",
           "wall ms", "peak MiB", "mem vs published", "note")
# What the CPU suite measures: the floor, wall time and peak memory are CUDA-only, so their columns stay empty.
CPU_COLUMNS = ("case", "dtype", "mode", "provider", "median ms", "samples", "IQR %", "vs published", "note")


def columns_for(device: torch.device) -> Tuple[str, ...]:
    return COLUMNS if device.type == "cuda" else CPU_COLUMNS


CSV_FIELDS = ("case", "B", "H", "K", "N", "dtype", "mode", "provider", "median_ms", "samples", "iqr_pct",
              "vs_published", "vs_floor", "wall_ms", "peak_mib", "mem_vs_published", "note")


def one_line(exc: BaseException, limit: int = 240) -> str:
    """``str(exc)`` on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Row:
    case: Shape
    dtype: str
    mode: str
    provider: str
    median_ms: Optional[float]
    samples: int = 0
    iqr_pct: Optional[float] = None
    wall_ms: Optional[float] = None
    vs_published: Optional[float] = None
    vs_floor: Optional[float] = None
    peak_mib: Optional[float] = None
    mem_vs_published: Optional[float] = None
    note: str = ""

    def cells(self, columns: Sequence[str] = COLUMNS) -> List[str]:
        def num(v, fmt):
            return "" if v is None else format(v, fmt)

        cells = [self.case.name, self.dtype, self.mode, self.provider,
                 num(self.median_ms, ".4g") if self.median_ms is not None else "n/a",
                 str(self.samples) if self.samples else "", num(self.iqr_pct, ".0f"),
                 num(self.vs_published, ".2f"), num(self.vs_floor, ".2f"), num(self.wall_ms, ".4g"),
                 num(self.peak_mib, ".1f"), num(self.mem_vs_published, ".2f"), self.note.replace("|", "/")]
        return [cell for name, cell in zip(COLUMNS, cells) if name in columns]

    def csv_row(self) -> dict:
        def num(v):
            return "" if v is None else repr(round(v, 6))

        return {"case": self.case.name, "B": self.case.B, "H": self.case.H, "K": self.case.K, "N": self.case.N,
                "dtype": self.dtype, "mode": self.mode, "provider": self.provider,
                "median_ms": num(self.median_ms), "samples": self.samples, "iqr_pct": num(self.iqr_pct),
                "vs_published": num(self.vs_published),
                "vs_floor": num(self.vs_floor), "wall_ms": num(self.wall_ms), "peak_mib": num(self.peak_mib),
                "mem_vs_published": num(self.mem_vs_published), "note": self.note}


def table_header(columns: Sequence[str] = COLUMNS) -> str:
    return "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|"


def machine_info(device: torch.device) -> List[str]:
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine()
    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:
        triton_version = "not installed"
    try:
        load = ", load average %.2f" % os.getloadavg()[0]
    except (AttributeError, OSError):
        load = ""
    lines = [
        f"machine: {cpu} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}{load}), "
        f"{platform.system()} {platform.release()}",
        f"versions: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {triton_version}",
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.append(f"gpu: {torch.cuda.get_device_name(device)} (sm_{props.major}{props.minor}, "
                     f"{props.total_memory / 2 ** 30:.0f} GiB), float32 matmul precision "
                     f"'{torch.get_float32_matmul_precision()}'")
    lines.append(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    return lines


def legend(floor: Optional[str] = None, gpu: bool = True) -> str:
    """The legend under the table; ``floor`` says what the layer's ``floor`` provider runs; ``gpu``: explain the
    CUDA-only columns too."""
    floor_text = f"1: as fast as the floor, {floor}" if floor else "1: as fast as the floor provider"
    text = ("median ms: median time of one call (CUDA: triton do_bench, L2 flushed; CPU: perf_counter samples, "
            "interleaved rounds). samples: the timed calls (CPU) or do_bench rounds (CUDA) behind the median; IQR %: "
            "their interquartile range in % of the median, the noise (with --quick, few samples: read ratios "
            "within that noise as equal). vs published = published ms / provider ms (> 1: faster than the published "
            "formulation). ")
    if gpu:
        text += (f"vs floor = floor ms / provider ms ({floor_text}). "
                 "wall ms (CUDA): wall-clock time per call of back-to-back calls, host launch overhead included "
                 "(do_bench's median hides launch overhead shorter than its L2 flush). "
                 "peak MiB (CUDA, fwd+bwd): peak allocated during one fwd+bwd above what inputs and parameters "
                 "hold; mem vs published = provider peak / published peak. ")
    return text + ("note: why a cell is missing or a check failed. Modes: fwd (forward with autograd recording), "
                   "bwd (torch.autograd.grad with retain_graph=True on a stored forward), fwd+bwd.")


class Report:
    """Collects rows, writes CSV incrementally and rewrites the markdown after each case.

    ``summary(rows)`` gives extra markdown lines after the legend (a layer's hook, e.g. a
    table of its targets); ``legend_text`` defaults to :func:`legend`.
    """

    def __init__(self, out_dir: Optional[str], header: List[str], stream=None,
                 summary: Optional[Callable[[Sequence[Row]], List[str]]] = None,
                 legend_text: Optional[str] = None, columns: Sequence[str] = COLUMNS):
        self.summary = summary
        self.columns = tuple(columns)
        self.legend = legend_text or legend()
        self.rows: List[Row] = []
        self.notes: List[str] = []
        self.header = header
        self.stream = stream or sys.stdout
        self.out_dir = out_dir
        self._csv = None
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            self._csv_file = open(os.path.join(out_dir, "results.csv"), "w", newline="")
            self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS)
            self._csv.writeheader()
            self._csv_file.flush()
        print("\n".join("# " + h if i == 0 else h for i, h in enumerate(header)), file=self.stream)
        print("", file=self.stream)
        print(table_header(self.columns), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def add(self, rows: List[Row]) -> None:
        self.rows.extend(rows)
        for row in rows:
            print("| " + " | ".join(row.cells(self.columns)) + " |", file=self.stream)
            if self._csv is not None:
                self._csv.writerow(row.csv_row())
        self.stream.flush()
        if self._csv is not None:
            self._csv_file.flush()
            self.write_markdown()

    def markdown(self) -> str:
        lines = ["# " + self.header[0]] + self.header[1:] + [""]
        lines += [table_header(self.columns)] + ["| " + " | ".join(r.cells(self.columns)) + " |" for r in self.rows]
        lines += ["", self.legend]
        extra = self.summary(self.rows) if self.summary else []
        if extra:
            lines += [""] + extra
        if self.notes:
            lines += ["", "Notes:"] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"

    def write_markdown(self) -> None:
        if self.out_dir:
            path = os.path.join(self.out_dir, "results.md")
            with open(path + ".tmp", "w") as f:
                f.write(self.markdown())
            os.replace(path + ".tmp", path)

    def close(self) -> None:
        if self._csv is not None:
            self.write_markdown()
            self._csv_file.close()
            self._csv = None


def write_plot(rows: List[Row], path: str, op: str) -> Optional[str]:
    """A bar chart of the speed-up over published per case and provider; returns a note if skipped.

    ``op`` (the layer's op name) titles each mode's panel. matplotlib is imported here only.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "speedup.png not written: matplotlib is not installed"
    modes = [m for m in MODES if any(r.mode == m and r.vs_published is not None for r in rows)]
    if not modes:
        return "speedup.png not written: no speed-ups measured"
    try:
        providers = [p for p in dict.fromkeys(r.provider for r in rows) if p != "published"]
        fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.6 + 0.9 * len(
            {(r.case.name, r.dtype) for r in rows})), 3.6 * len(modes)), squeeze=False)
        for ax, mode in zip(axes[:, 0], modes):
            groups = list(dict.fromkeys((r.case.name, r.dtype) for r in rows if r.mode == mode))
            width = 0.8 / max(len(providers), 1)
            for j, p in enumerate(providers):
                values = {(r.case.name, r.dtype): r.vs_published for r in rows
                          if r.mode == mode and r.provider == p and r.vs_published is not None}
                xs = [i + (j - (len(providers) - 1) / 2) * width for i, g in enumerate(groups) if g in values]
                ys = [values[g] for g in groups if g in values]
                if xs:
                    ax.bar(xs, ys, width, label=p)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{c}\n{d}" for c, d in groups], fontsize=7)
            ax.set_ylabel("speed-up over published")
            ax.set_title(f"{op}, {mode}")
            ax.legend(fontsize=7, ncol=min(len(providers), 4))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    except Exception as exc:  # a plot must never lose the measurements
        return f"speedup.png not written: {type(exc).__name__}: {one_line(exc)}"
    return None
