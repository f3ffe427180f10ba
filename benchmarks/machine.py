"""What a benchmark's figures were measured on."""

from __future__ import annotations


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
