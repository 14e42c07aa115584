"""Failures turned into one-line reasons, so a failed run becomes a row instead of a crash."""

from __future__ import annotations


def is_oom(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate" in text or (
        "not enough memory" in text)


def reason(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]
