"""The server tests' shared pieces: a real ``rwkvpy serve`` in a subprocess and its clients.

Used by tests/test_server*.py, test_structured.py, test_demo_chat.py and test_lm_eval.py; the
fixtures ``client`` and ``http`` of tests/conftest.py open these clients on a module's
``server`` fixture.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import TINY_V7, fixture_path


class Server:
    """``rwkvpy.server`` in a subprocess: TINY_V7 unless ``model`` (a path or 'demo'). When
    it does not start and answer /health within ``startup_s`` (or anything else fails while
    it starts), the process is killed and reaped and the log closed before the error."""

    def __init__(self, args, log_path, model=None, startup_s=120.0):
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until stop()
        self.proc = None
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("RWKVPY_API_KEY", None)
        try:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rwkvpy.server",
                    "-m",
                    str(model if model is not None else fixture_path(*TINY_V7)),
                    "--port",
                    "0",
                    "--threads",
                    "1",
                    *args,
                ],
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=env,
            )
            deadline = time.monotonic() + startup_s
            self.url = self._wait_url(deadline)
            self._wait_healthy(deadline)
        except BaseException:  # a failed start, a timeout, Ctrl-C: nothing left running
            self._kill()
            raise

    def _kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()
        self.log.close()

    def _wait_url(self, deadline) -> str:
        while time.monotonic() < deadline:
            m = re.search(r"listening on (http://[0-9.]+:\d+)", self.text())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        pytest.fail(f"the server did not start:\n{self.text()}")

    def _wait_healthy(self, deadline) -> None:
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"the server did not become healthy:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@contextlib.contextmanager
def serving(args, log_path, model=None, *, clean=True):
    """A started :class:`Server`, stopped when the block ends; with ``clean``, it must exit with
    status 0 and leave no traceback in its log."""
    server = Server(args, log_path, model)
    try:
        yield server
    finally:
        code = server.stop()
    if clean:
        assert code == 0, server.text()
        assert "Traceback" not in server.text(), server.text()


def openai_client(server, api_key=None, timeout=60):
    """The official client on ``server``'s /v1 (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(
        base_url=server.url + "/v1", api_key=api_key or "none", max_retries=0, timeout=timeout
    )


def http_client(server, api_key=None, timeout=60):
    """An httpx client on ``server``, sending ``api_key`` as a bearer token when given."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=timeout)
