"""Machine description shared by the benchmark reports."""

from __future__ import annotations

import os
import platform


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


def describe(threads: int) -> str:
    """``"N CPUs available (nproc), <CPU model>; torch.set_num_threads(T); Python x, torch y, torchvision z"``."""
    import torch
    import torchvision

    return (
        f"{len(os.sched_getaffinity(0))} CPUs available (nproc), {cpu_model()}; torch.set_num_threads({threads}); "
        f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}"
    )


def emit_report(lines: list[str], output: str) -> None:
    """Print a markdown report and, when ``output`` is set, write it there atomically."""
    from ovd.utils.io import atomic_open

    report = "\n".join(lines) + "\n"
    print(report)
    if output:
        with atomic_open(output, "w") as f:
            f.write(report)
