"""Range checks shared by the sections' `_validate`.

Each raises `ValueError("<key>: must be ...")`, which `load.py` reports as a ConfigError naming
the dotted key. Comparisons are written `not v >= lo` so that NaN fails them (non-finite
floats are refused earlier, when a value is converted, but a check must not rely on that).
"""

from __future__ import annotations

from typing import Any


def at_least(section: Any, lo: float, *keys: str, note: str = "") -> None:
    """Every one of `keys` of `section` is >= `lo`; `note` says what the bound value means,
    e.g. " (0: the whole validation split)"."""
    for key in keys:
        v = getattr(section, key)
        if not v >= lo:
            raise ValueError(f"{key}: must be >= {lo}{note}, got {v}")


def above(section: Any, lo: float, *keys: str) -> None:
    """Every one of `keys` of `section` is > `lo`."""
    for key in keys:
        v = getattr(section, key)
        if not v > lo:
            raise ValueError(f"{key}: must be > {lo}, got {v}")


def within(section: Any, lo: float, hi: float, *keys: str, open_lo: bool = False) -> None:
    """Every one of `keys` of `section` is in [lo, hi] (in (lo, hi] with `open_lo`)."""
    for key in keys:
        v = getattr(section, key)
        if not ((v > lo if open_lo else v >= lo) and v <= hi):
            raise ValueError(f"{key}: must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}")


def sampling(section: Any) -> None:
    """`temperature` >= 0 (0: greedy), `top_k` >= 0 (0: off), `top_p` in (0, 1]."""
    at_least(section, 0, "temperature", note=" (0: greedy)")
    at_least(section, 0, "top_k", note=" (0: no top-k filter)")
    within(section, 0.0, 1.0, "top_p", open_lo=True)
