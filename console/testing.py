"""Helpers for driving the console with Textual's Pilot (tests and demos)."""

from __future__ import annotations

import time


async def until(pilot, cond, timeout: float, what):
    """Poll ``cond()`` (letting the app run between polls) until it returns something
    truthy, and return that; fail after ``timeout`` seconds naming ``what`` (a string,
    or a callable that describes the state at the time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for: {what() if callable(what) else what}")
