"""Describe the machine a benchmark ran on: CPU, cores, memory, GPU, library versions, date."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
from pathlib import Path

import duckdb
import faiss
import numpy as np
import torch
import transformers


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or platform.processor() without it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_bytes() -> int | None:
    """Return total RAM in bytes from /proc/meminfo, or None where it is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def gpu_description() -> str:
    if not torch.cuda.is_available():
        return "none (CUDA not available to torch)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = torch.cuda.get_device_properties(0).total_memory / 2**30
    return f"{', '.join(names)} ({memory:.0f} GiB on device 0); faiss sees {faiss.get_num_gpus()} GPU(s)"


def describe_machine(folder: Path) -> dict:
    """Return the facts the results page prints about this machine and run."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": memory_bytes(),
        "gpu": gpu_description(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "free_disk_bytes": shutil.disk_usage(folder).free,
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__, "faiss": faiss.__version__, "duckdb": duckdb.__version__,
            "numpy": np.__version__, "transformers": transformers.__version__,
        },
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
