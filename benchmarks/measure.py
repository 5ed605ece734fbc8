"""What the benchmark scripts share: the peak memory of the process."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_of_this_process() -> float:
    """VmHWM in MB: unlike ru_maxrss it is not inherited from the parent across fork+exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: kB on Linux, bytes on macOS
