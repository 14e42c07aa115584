"""Facts about the machine: its name, cache, free memory, and how busy other processes keep it."""

from __future__ import annotations

import os
import platform
import re
import time

import torch

from .cases import SIZE_UNITS


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or (64 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip().upper()
            m = re.fullmatch(r"(\d+)([KMG]?)", text)
            if m:
                best = max(best, int(m.group(1)) * SIZE_UNITS[m.group(2)])
    except OSError:
        pass
    return best or (32 << 20)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch_version": torch.__version__,
        "triton_version": triton_version,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": _loadavg(),
        "cpu_busy_pct_at_start": _cpu_busy_pct() if device.type == "cpu" else None,
    }


def _cpu_busy_pct(interval=0.3) -> float | None:
    """Percentage of all CPUs' time spent busy over `interval` (Linux /proc/stat), else None."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return None if t1 == t0 else round(100.0 * (1 - (i1 - i0) / (t1 - t0)), 1)


class OthersCpu:
    """The share of all CPUs that other processes used between two snapshots (Linux only)."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)
            t = os.times()
            return busy / os.sysconf("SC_CLK_TCK"), time.monotonic(), t.user + t.system
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def pct(self) -> float | None:
        """Percent of all CPUs busy with other processes since the snapshot taken at creation."""
        end = self._snapshot()
        if self.start is None or end is None or end[1] - self.start[1] < 0.05:
            return None
        others = (end[0] - self.start[0]) - (end[2] - self.start[2])
        share = others / ((end[1] - self.start[1]) * (os.cpu_count() or 1))
        return round(min(max(100.0 * share, 0.0), 100.0), 1)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None
