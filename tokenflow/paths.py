"""Where the library keeps its caches (built tiny models, inversions)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$TOKENFLOW_CACHE`` if set, else the platform's user cache dir (e.g. ``~/.cache/tokenflow``)."""
    env = os.environ.get("TOKENFLOW_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tokenflow", appauthor=False))
