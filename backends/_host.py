"""What the CPU backends say about the host, and how they quote an engine's error: shared
so that every backend names the same CPU and keeps a message to one line."""

from __future__ import annotations

import os
import platform
from typing import Dict, Tuple


def cpu_name_and_vendor() -> Tuple[str, str]:
    """The CPU's model name and vendor from /proc/cpuinfo, else what platform knows."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
    except OSError:
        pass
    vendors = {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}
    vendor_id = fields.get("vendor_id", "")
    name = fields.get("model name") or platform.processor() or platform.machine()
    return name, vendors.get(vendor_id, vendor_id)


def cpu_name() -> str:
    return cpu_name_and_vendor()[0]


def available_cores() -> int:
    """Cores this process may run on (its affinity, where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's text on one line, cut at ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
