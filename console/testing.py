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


async def until_asked(pilot, timeout: float = 20):
    """Wait until the console's confirmation question is on screen (and, for a typed
    confirmation, its input has the focus), so the keys that answer it reach it. A fixed
    pause is not enough on a busy machine: the question is pushed by a worker."""
    from console.app import Confirm

    def asked():
        screen = pilot.app.screen
        if not isinstance(screen, Confirm):
            return False
        return screen.expect is None or pilot.app.focused is not None
    return await until(pilot, asked, timeout, "the confirmation question")
