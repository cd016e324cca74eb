"""LiteLLM's proxy, installed from PyPI into bench/.venv-litellm and run on the fake backend.

The venv is the harness's own (gitignored) so LiteLLM's hundred dependencies never
touch Shoal's. `ensure()` creates it with `python -m venv` and `pip install
'litellm[proxy]'` when allowed, and reports plainly why LiteLLM cannot be measured
otherwise; a scenario then shows that reason in place of a number.

It runs as documented for a single process: `litellm --config ... --num_workers 1`, with
a master key (LiteLLM refuses to start without one) and the uvicorn access log off (as
Shoal and the aiohttp baseline run without one), its model cost map read from the
package instead of fetched, telemetry off.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bench.processes import Processes, Service, free_port

VENV = Path(__file__).resolve().parent.parent / ".venv-litellm"
MARKER = VENV / ".installed"  # written only after pip succeeded
MASTER_KEY = "sk-bench-local-only"
INSTALL_TIMEOUT_S = 15 * 60
_LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
    "loggers": {
        "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
        "uvicorn.error": {"level": "WARNING"},
        "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
    },
}


def installed() -> bool:
    return MARKER.exists() and (VENV / "bin" / "litellm").exists()


def ensure(allow_install: bool) -> str | None:
    """None when LiteLLM is ready to run, else why it is not."""
    if installed():
        return None
    if not allow_install:
        return (
            "not installed, and installing it takes over a minute (quick mode skips it; "
            "`python -m bench throughput` installs it)"
        )
    log = VENV.parent / "results" / "tmp" / "litellm-install.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with log.open("w") as out:
            subprocess.run(
                [sys.executable, "-m", "venv", "--clear", str(VENV)],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=300,
            )
            subprocess.run(
                [
                    str(VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "-q",
                    "--disable-pip-version-check",
                    "litellm[proxy]",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=INSTALL_TIMEOUT_S,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
        return f"installing litellm[proxy] failed ({exc}); see {log}: ...{tail}"
    MARKER.write_text(f"installed in {time.monotonic() - started:.0f} s\n")
    return None


def version() -> str:
    done = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pip", "show", "litellm"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    for line in done.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return "?"


def start(procs: Processes, backend: Service, model: str, *, cpus: str | None) -> Service:
    home = procs.home / "litellm"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.yaml"
    # YAML is a superset of JSON: no YAML writer needed.
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": model,
                        "litellm_params": {
                            "model": f"openai/{model}",
                            "api_base": backend.url + "/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False, "set_verbose": False},
                "general_settings": {"master_key": MASTER_KEY},
            }
        )
    )
    log_config = home / "log_config.json"
    log_config.write_text(json.dumps(_LOG_CONFIG))
    port = free_port()
    argv = [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
        "--log_config",
        str(log_config),
    ]
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
        "PYTHONPATH": "",
    }
    return procs.spawn("litellm", argv, port=port, cpus=cpus, env=env, timeout_s=180, cwd=home)


HEADERS = {"Authorization": f"Bearer {MASTER_KEY}"}
