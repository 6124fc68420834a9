"""Machine description and report writing shared by every benchmark script.

A report is markdown: optional ``# title``, the exact command (:func:`command`), the machine
(:func:`describe`), the :data:`VARIES` line, then the script's own tables (:func:`table_header`, :func:`row`),
written by :func:`emit_report` (printed, and saved atomically to ``--output`` when given).
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Sequence

VARIES = (
    "Numbers vary across hosts by float rounding and host speed: ratios measured side by side in one run "
    "carry over, absolute times are context only."
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what the platform reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """``"load average 1.2 / 1.0 / 0.9 (1 / 5 / 15 min)"`` (the machine may be shared)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min)"


def describe(threads: int | None = None, *, gpu: bool = False, load: bool = False) -> str:
    """``"N CPUs available (nproc), <CPU model>; torch.set_num_threads(T); Python x, torch y, torchvision z"``.

    ``threads`` defaults to torch's current setting; ``gpu`` adds the CUDA device's name (or "no GPU");
    ``load`` adds :func:`load_average`.
    """
    import torch
    import torchvision

    threads = torch.get_num_threads() if threads is None else threads
    text = (
        f"{len(os.sched_getaffinity(0))} CPUs available (nproc), {cpu_model()}; torch.set_num_threads({threads}); "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )
    if gpu:
        text += f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no GPU"
    if load:
        text += f"; {load_average()}"
    return text


def command(argv: Sequence[str] | None = None) -> str:
    """The exact command that ran this script, ``python <script path as typed> <args>`` (``argv``: its args)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", sys.argv[0], *args])


def header(
    title: str = "",
    details: str = "",
    *,
    argv: Sequence[str] | None = None,
    threads: int | None = None,
    gpu: bool = False,
    load: bool = False,
    level: int = 1,
) -> list[str]:
    """The lines every report starts with: title (a ``level`` heading), ``Command:``, ``Machine:``,
    :data:`VARIES`, then ``details`` (a line, or several)."""
    lines = ["#" * level + f" {title}", ""] if title else []
    machine = describe(threads, gpu=gpu, load=load)
    lines += [f"Command: `{command(argv)}`", "", f"Machine: {machine}.", "", VARIES, ""]
    if details:
        lines += [details, ""]
    return lines


def table_header(columns: Sequence[str], align: str) -> list[str]:
    """A markdown table's two header lines; ``align`` has one letter per column: ``l`` (``---``) or ``r`` (``---:``)."""
    if len(align) != len(columns):
        raise ValueError(f"{len(columns)} columns but {len(align)} alignment letters")
    return [row(*columns), "|" + "".join("---:|" if a == "r" else "---|" for a in align)]


def row(*cells: object) -> str:
    """One markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def emit_report(lines: list[str], output: str | os.PathLike[str] | None) -> None:
    """Print a markdown report and, when ``output`` is set, write it there atomically."""
    from ovd.utils.io import atomic_open

    report = "\n".join(lines) + "\n"
    print(report)
    if output:
        with atomic_open(output, "w") as f:
            f.write(report)
