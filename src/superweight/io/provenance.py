"""Provenance stamped on every record: package versions, the date and the git hash (lm-evaluation-harness's
habit). A probe that fails gives None and never breaks a run.

    provenance()   # {"superweight", "git" ("a1744d5"), "torch", "transformers", "python", "date"}
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # provenance probes never break a run


def provenance() -> dict:
    """Versions, date and git hash for the record."""
    import torch
    import transformers

    from superweight import __version__

    return {
        "superweight": __version__,
        "git": _git_hash(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
