"""Confinement of file paths to a directory: one check for every file the worker reads on an
operator's or producer's say (credential files, image sources)."""

from __future__ import annotations

import os


def strictly_inside(path: str, directory: str) -> bool:
    """``path`` is strictly below ``directory`` (both absolute and normalised; resolve links
    and ``..`` before asking)."""
    return path != directory and os.path.commonpath([path, directory]) == directory
