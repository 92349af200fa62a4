"""How a launcher names the program its ranks run (what they hand back goes through bench.launch.handback): used by
every launch, and by the shared-memory probe that every launch depends on (so this module imports nothing of the
launcher)."""
from __future__ import annotations

import sys


def python_module_argv(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]
