"""nginx as a reverse proxy in front of the fake backend: the floor a proxy can reach.

The binary is `nginx` on PATH if there is one, else Debian's `nginx` package unpacked
(`apt-get download` + `dpkg -x`, no maintainer scripts, so no service is started) into
bench/.nginx (gitignored). One worker process, access log off, keep-alive to the
backend, response buffering off (so streams pass chunk by chunk, as Shoal relays them).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.processes import Processes, Service, free_port

HERE = Path(__file__).resolve().parent.parent
UNPACKED = HERE / ".nginx"
BINARY = UNPACKED / "usr" / "sbin" / "nginx"

_CONFIG = """
worker_processes 1;
daemon off;
master_process off;
error_log {home}/error.log warn;
pid {home}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {home}/body;
    proxy_temp_path {home}/proxy;
    fastcgi_temp_path {home}/fastcgi;
    uwsgi_temp_path {home}/uwsgi;
    scgi_temp_path {home}/scgi;
    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def binary(allow_fetch: bool) -> tuple[str | None, str]:
    """The nginx to run, or None and why there is none."""
    found = shutil.which("nginx")
    if found:
        return found, ""
    if BINARY.exists():
        return str(BINARY), ""
    if not allow_fetch:
        return None, "nginx is not installed (a full run unpacks Debian's package)"
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        return None, "nginx is not installed, and there is no apt-get/dpkg to fetch it"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                ["apt-get", "download", "nginx"], cwd=tmp, capture_output=True, check=True,
                timeout=120,
            )  # fmt: skip
            package = next(Path(tmp).glob("nginx_*.deb"))
            subprocess.run(
                ["dpkg", "-x", str(package), str(UNPACKED)], capture_output=True, check=True,
                timeout=60,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError, StopIteration) as exc:
            return None, f"fetching Debian's nginx failed: {exc}"
    return (str(BINARY), "") if BINARY.exists() else (None, "no nginx in Debian's package")


def version(path: str) -> str:
    done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def start(procs: Processes, path: str, backend: Service, *, cpus: str | None) -> Service:
    home = procs.home / "nginx"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = home / "nginx.conf"
    config.write_text(_CONFIG.format(home=home, backend_port=backend.port, port=port))
    return procs.spawn("nginx", [path, "-p", str(home), "-c", str(config)], port=port, cpus=cpus)
