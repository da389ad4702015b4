"""Go-style durations and Kubernetes quantities, as flags and config files write them."""

from __future__ import annotations

import math
import re
from typing import Any

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$")
_QUNIT = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
          "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_duration(v: Any, where: str = "duration") -> float:
    """Seconds from a Go duration ("200ms", "1m30s"; a bare string number only "0", as in
    Go) or a YAML number of seconds; ValueError naming `where` otherwise."""
    if isinstance(v, bool):
        raise ValueError(f"{where}: expected a duration, got {v!r}")
    if isinstance(v, (int, float)):
        secs = float(v)
    elif isinstance(v, str) and v.strip():
        s = v.strip()
        if s == "0":
            return 0.0
        pos, secs = 0, 0.0
        for m in _DURATION.finditer(s):
            if m.start() != pos:
                break
            secs += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ValueError(f"{where}: {v!r} is not a duration like 200ms or 1m30s")
    else:
        raise ValueError(f"{where}: expected a duration, got {v!r}")
    if not math.isfinite(secs) or secs < 0:
        raise ValueError(f"{where}: duration must be finite and >= 0, got {v!r}")
    return secs


def parse_quantity(v: Any, where: str = "size") -> int:
    """Bytes from an int or a Kubernetes quantity ("64Mi", "1G")."""
    if isinstance(v, bool):
        raise ValueError(f"{where}: expected a size, got {v!r}")
    if isinstance(v, int):
        n = v
    elif isinstance(v, float) and v.is_integer():
        n = int(v)
    elif isinstance(v, str) and (m := _QUANTITY.match(v.strip())):
        n = int(float(m.group(1)) * _QUNIT[m.group(2)])
    else:
        raise ValueError(f"{where}: {v!r} is not a size like 1048576, 64Mi or 1G")
    if n < 0:
        raise ValueError(f"{where}: size must be >= 0, got {v!r}")
    return n
