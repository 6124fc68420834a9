"""benchmarks/machine.py and benchmarks/timing.py: the report pieces and timers every benchmark script shares."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


machine, timing = _load("machine"), _load("timing")


def test_table_header_and_rows_are_markdown_with_the_given_alignment():
    assert machine.table_header(["a", "b (ms)", "c"], "lrl") == ["| a | b (ms) | c |", "|---|---:|---|"]
    assert machine.row("x", 1.5, None) == "| x | 1.5 | None |"
    with pytest.raises(ValueError, match="3 columns but 2"):
        machine.table_header(["a", "b", "c"], "lr")


def test_header_names_the_exact_command_the_machine_and_the_variance_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--out", "a b.md"])
    lines = machine.header("Title", "details", threads=3, level=2)
    assert lines[:3] == ["## Title", "", "Command: `python benchmarks/bench_x.py --out 'a b.md'`"]
    assert lines[4].startswith("Machine: ") and "torch.set_num_threads(3)" in lines[4]
    assert machine.VARIES in lines and lines[-2:] == ["details", ""]
    assert machine.command(["--n", "1"]) == "python benchmarks/bench_x.py --n 1"


def test_emit_report_prints_and_writes_the_same_text(tmp_path, capsys):
    out = tmp_path / "sub" / "r.md"
    machine.emit_report(["a", "", "| x |"], str(out))
    assert out.read_text() == "a\n\n| x |\n"
    assert capsys.readouterr().out == "a\n\n| x |\n\n"
    machine.emit_report(["b"], "")  # no file
    assert sorted(p.name for p in out.parent.iterdir()) == ["r.md"]


def test_sample_warms_up_then_times_each_call():
    calls = []
    times = timing.sample(lambda: calls.append(1), repeats=4, warmup=2, sync=lambda: calls.append(0))
    assert len(times) == 4 and all(t >= 0 for t in times)
    assert calls == [1, 1, 0] + [1, 0] * 4  # sync once after the warm-up, then inside each timed call


def test_timed_interleaved_alternates_which_side_goes_first():
    order = []
    wall, cpu = timing.timed_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 1, 3)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in (*wall.values(), *cpu.values())] == [3, 3, 3, 3]


def test_stopwatch_measures_wall_and_cpu_time():
    with timing.Stopwatch() as w:
        sum(i * i for i in range(200_000))
    assert w.s > 0 and w.cpu > 0
    running = timing.Stopwatch()
    assert running.elapsed() >= 0 and running.s == 0.0
