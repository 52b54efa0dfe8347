"""The environment of a child Python process in the transport tests: the repository first on
PYTHONPATH, the caller's entries kept after it (a --target install of the test dependencies, as
on the lent GPU machine, must reach the child too)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_path() -> str:
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def child_env(base: dict | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    return {**env, "PYTHONPATH": child_path(), **extra}
