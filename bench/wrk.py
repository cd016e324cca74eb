"""wrk (Debian's `wrk`), the load generator for request rates: C, one thread, pinnable.

    run(url, body, connections=16, seconds=3, cpus="0") -> Load

A Python client would spend about as much CPU per request as the proxy it measures;
wrk spends a small fraction of that, so the proxy, not the client, is what saturates.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.processes import pinned

_SCRIPT = """
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
{headers}
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


@dataclass
class Load:
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int  # socket errors, timeouts and non-2xx answers


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse(output: str) -> Load:
    requests = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (requests and rate and p50 and p99):
        raise ValueError(f"cannot read wrk's output:\n{output}")
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non2xx[1]) if non2xx else 0
    return Load(
        requests=int(requests[1]),
        seconds=_ms(requests[2] + requests[3]) / 1000,
        requests_per_s=float(rate[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        errors=errors,
    )


def run(
    url: str,
    body: bytes,
    *,
    connections: int,
    seconds: float,
    cpus: str | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Load:
    """POST `body` to `url` from `connections` keep-alive connections for `seconds`."""
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(_SCRIPT.format(body=body.decode(), headers=extra))
        argv = [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            f"--timeout={timeout_s:g}s",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(
            pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + timeout_s + 30
        )
    if done.returncode:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout)
