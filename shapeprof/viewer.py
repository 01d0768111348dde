"""`shapeprof view`: TensorBoard over a logdir, as a child that never outlives the command that started it.

TensorBoard runs in a process group of its own (with the data server it may start), and `serve` stops that whole
group however it ends: TensorBoard exiting by itself, Ctrl-C (SIGINT), SIGTERM (``kill``, a supervisor, a CI
runner's timeout), SIGHUP (the terminal closed), or an exception. A TensorBoard left behind would keep serving the
logdir and hold the port, so the next `shapeprof view` on it fails. (SIGKILL cannot be caught: nothing stops the
child then.)
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

__all__ = ["serve", "tensorboard_command"]

_GRACE_SECONDS = 5.0   # how long TensorBoard gets to exit on SIGTERM before it is killed


class _Stop(BaseException):
    """Raised in the main thread by the signal handler: unwinds `serve` like KeyboardInterrupt does."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def tensorboard_command(logdir: str | os.PathLike, host: str, port: int) -> list[str]:
    """The TensorBoard command line `serve` runs (this Python's tensorboard)."""
    return [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", host, "--port", str(port)]


def serve(logdir: str | os.PathLike, *, host: str, port: int) -> int:
    """Run TensorBoard over `logdir` on `host`:`port` until it exits or this process is told to stop.

    Returns:
        TensorBoard's exit status when it exits by itself; 0 after Ctrl-C (the way a user stops it); 128 + the
        signal's number after SIGTERM or SIGHUP, as a shell reports a process ended by that signal.
    """
    cmd = tensorboard_command(Path(logdir), host, port)
    previous = {}
    if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread only
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None:
                previous[sig] = signal.signal(sig, _raise_stop)
    child = None
    try:
        # its own process group: Ctrl-C reaches only us, and stopping the group stops what TensorBoard started
        child = subprocess.Popen(cmd, start_new_session=True)
        return child.wait()
    except KeyboardInterrupt:
        return 0
    except _Stop as e:
        return 128 + e.signum
    finally:
        if child is not None:
            _stop(child)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _raise_stop(signum: int, frame) -> None:
    raise _Stop(signum)


def _stop(child: subprocess.Popen) -> None:
    """SIGTERM to the child's group; SIGKILL to what is left of it after the grace period (at once on a second
    signal meanwhile)."""
    try:
        _signal_group(child, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=_GRACE_SECONDS)
    except (KeyboardInterrupt, _Stop):   # impatient: a second Ctrl-C or SIGTERM while it shuts down
        pass
    finally:
        # only while the group still has members: a group id is not reused while it does, so this never
        # signals someone else's processes
        if _signal_group(child, 0):
            _signal_group(child, signal.SIGKILL)   # TensorBoard, or a data server it left behind
        with contextlib.suppress(Exception):
            child.wait()


def _signal_group(child: subprocess.Popen, sig: int) -> bool:
    """Send `sig` to the child's process group; False when the group has no process left."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(child.pid, sig)   # the group's id is the child's pid (start_new_session)
        else:
            child.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
