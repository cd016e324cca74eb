"""`shoal doctor` against real node processes on loopback: healthy, its port taken by
another process, no backend. (The LAN cases, a peer bound to loopback and a wrong
secret, are in tests/netns/test_doctor_lan.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import NodeProcess, clean_env, free_port, start_node


def doctor(home: Path, port: int, data_dir: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    config = home / "doctor.toml"
    config.write_text(f"port = {port}\ndata_dir = {json.dumps(str(data_dir))}\n")
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "doctor", "--json", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        env=clean_env(home),
        timeout=60,
    )
    return done.returncode, json.loads(done.stdout)


def levels(report: dict[str, Any], level: str) -> list[str]:
    return [c["summary"] for c in report["checks"] if c["level"] == level]


@pytest.mark.engine
def test_healthy_node(engine_node: NodeProcess, tmp_path: Path) -> None:
    port = int(engine_node.url.rsplit(":", 1)[1])
    code, report = doctor(tmp_path, port, engine_node.data_dir)
    assert code == 0, report
    assert report["ok"] and report["problems"] == 0
    checks = {c["check"] for c in report["checks"] if c["level"] == "ok"}
    assert {"node", "backends", "disk"} <= checks
    assert any("embedded" in s for s in levels(report, "ok"))
    # on loopback: a plain remark, not a problem, with what to do for a cluster
    bind = next(c for c in report["checks"] if c["check"] == "bind")
    assert bind["level"] == "info" and "--lan" in bind["fix"]


def test_port_taken(tmp_path: Path) -> None:
    port = free_port()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys, time\n"
         f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
         "print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        code, report = doctor(tmp_path, port, tmp_path / "data")
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    assert code == 1
    [taken] = levels(report, "fail")
    assert f"127.0.0.1:{port} is taken by" in taken and f"pid {holder.pid}" in taken
    assert any("no Shoal node answers" in s for s in levels(report, "info"))


def test_no_backend(tmp_path: Path) -> None:
    node = start_node(tmp_path / "node", "--no-embedded", wait_backend=None)
    try:
        port = int(node.url.rsplit(":", 1)[1])
        code, report = doctor(tmp_path, port, node.data_dir)
    finally:
        node.stop()
    assert code == 1
    [problem] = [c for c in report["checks"] if c["level"] == "fail"]
    assert problem["check"] == "backends" and "no backend" in problem["summary"]
    assert "embedded engine" in problem["fix"]
