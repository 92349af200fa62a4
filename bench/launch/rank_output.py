"""How a launcher names the program its ranks run and reads what they print: used by every launch, and by the
shared-memory probe that every launch depends on (so this module imports nothing of the launcher)."""
from __future__ import annotations

import json
import sys


def python_module_argv(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


def json_after(text: str, marker: str) -> list:
    """Every JSON value that follows `marker` in the merged output of ranks. mpirun forwards each rank's output in
    chunks, so one rank's line can land in the middle of another's: decode values where they start, not lines."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while (at := text.find(marker, at)) != -1:
        at += len(marker)
        try:
            value, at = decoder.raw_decode(text, at)
            found.append(value)
        except json.JSONDecodeError:
            pass
    return found
