"""`shoal demo`: three real nodes on loopback; a request to a node without the model is
served by the one with it; SIGINT leaves no process and no folder behind."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import SMOLLM_ID
from tests.support import clean_env

pytestmark = pytest.mark.engine


def read_until(process: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([process.stdout], [], [], left)[0]:
            raise AssertionError(f"no {marker!r} within {timeout} s; output:\n{seen}")
        # The descriptor, not the buffered reader: a readline would leave later lines in
        # the reader's buffer, where select() cannot see them.
        data = os.read(process.stdout.fileno(), 65536)
        if not data:
            raise AssertionError(f"the demo exited {process.wait()}; output:\n{seen}")
        seen += data.decode(errors="replace")
    return seen


def test_demo_routes_and_cleans_up(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "shoal", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**clean_env(tmp_path), "COLUMNS": "250"},
        start_new_session=True,
    )
    family: list[psutil.Process] = []
    try:
        output = read_until(demo, "demo ready", 150)
        urls = re.findall(r"(http://127\.0\.0\.1:\d+)/v1 ", output)
        assert len(urls) == 3, output
        folder = Path(re.findall(r"logs and data: (\S+)", output)[0])
        assert folder.is_dir()
        family = psutil.Process(demo.pid).children(recursive=True)
        assert len(family) >= 4  # three nodes and the first one's engine
        assert "curl" in output and "OpenAI(" in output and f"{urls[0]}/" in output

        body = {"model": SMOLLM_ID, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}  # fmt: skip
        request = urllib.request.Request(
            urls[2] + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
            assert response.headers["X-Shoal-Served-By"] == "demo-1"
            assert response.headers["X-Shoal-Route"] == "peer"
        assert answer["choices"][0]["message"]["content"] is not None

        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        assert demo.stdout is not None
        demo.stdout.close()
    _gone, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, f"left behind: {alive}"
    assert not folder.exists()
