"""One line describing the machine a benchmark ran on, for its results table."""

import os
import platform


def machine_describe() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), cpu
            )
    except OSError:
        pass
    described = f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
    try:
        import torch

        if torch.cuda.is_available():
            described += f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return described
