"""BENCHMARKS.md is written by several benchmarks, each owning one section between markers
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->``: a rerun replaces only its own."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from grace.atomic_io import write_text


def write_section(path: Path, name: str, section: str) -> None:
    """Replace section ``name`` of ``path`` (or append it); the other sections stay as they are."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(path, text)


def cpus() -> str:
    """``"2 CPUs (model name, arch)"``: the CPU model matters, since which matmul path wins, and
    by how much, differs between CPUs of the same core count."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip() + ", "
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs ({model}{platform.machine() or platform.processor()})"
