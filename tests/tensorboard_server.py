"""A real TensorBoard on 127.0.0.1 for tests: started over a logdir, asked through its HTTP data API, always stopped."""
from __future__ import annotations

import contextlib
import gzip
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running TensorBoard: its URL, and its log for failure messages."""

    def __init__(self, url: str, log: Path):
        self.url, self.log = url, log

    def get(self, path: str, **params) -> bytes:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as response:
            body = response.read()
            return gzip.decompress(body) if response.headers.get("Content-Encoding") == "gzip" else body

    def json(self, path: str, **params):
        return json.loads(self.get(path, **params))

    def profiler(self, route: str, **params):
        """The PyTorch Profiler plugin's data API: /data/plugin/pytorch_profiler/<route>."""
        return self.json(f"/data/plugin/pytorch_profiler/{route}", **params)

    def wait_for(self, what: str, ready: Callable[[], object], timeout: float = 60.0):
        """Poll `ready()` until it returns something truthy: TensorBoard and the profiler plugin load runs in the
        background, so a run is listed some time after the server answers."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = ready()
                if value:
                    return value
            except (OSError, ValueError, KeyError):   # not up yet, or the run not loaded yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"TensorBoard never showed {what}; its log ends:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.25)


@contextlib.contextmanager
def serve(logdir: Path, log: Path, profiler_runs: set[str] = frozenset()) -> Iterator[Server]:
    """TensorBoard over `logdir` until the block ends, once the profiler plugin has loaded `profiler_runs`."""
    port = free_port()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
                                 "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        server = Server(f"http://127.0.0.1:{port}", log)

        def loaded():
            runs = server.profiler("runs")
            return not runs["loading"] and set(profiler_runs) <= set(runs["runs"])

        server.wait_for(f"the profiler runs {sorted(profiler_runs)}", loaded)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
