"""A model on one node's disk is served from any node (issue 10, item 4), in one process.

Two real nodes over mutual TLS. a has the packaged SmolLM2 GGUF in a configured folder,
not loaded, and a real llama-server to load it with; b has no model at all. b learns
from a's advert that a holds the file (not loaded), so a request to b goes to a, which
loads the model: the client gets 503 + Retry-After while it loads (the OpenAI SDK
retries by itself), then 200, served by a.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

from shoal.events import ModelLoaded, ModelLoading, RequestFinished
from tests.cluster import model_node, wait_until
from tests.conftest import llama_server_command, packaged_gguf

pytestmark = [pytest.mark.engine, pytest.mark.timeout(120)]

MODEL = "smollm2-135m-instruct:q4_1"  # the catalog's name for the packaged file


async def test_a_model_only_on_as_disk_is_served_to_bs_client_by_a(tmp_path: Path) -> None:
    folder = tmp_path / "gguf"
    folder.mkdir()
    (folder / packaged_gguf().name).symlink_to(packaged_gguf())
    binary, _ = llama_server_command()
    a_models = {"folders": [folder], "llama_server": binary, "context": 1024, "parallel": 1}
    async with (
        model_node(tmp_path, "a", **a_models) as a,
        model_node(tmp_path, "b", llama_server=binary) as b,
    ):
        await b.node.admission.meet(a.url, "join")
        await b.wait_for_model(MODEL)
        (listed,) = [m for m in b.node.views.models(local_only=False)["data"] if m["id"] == MODEL]
        assert (listed["loaded"], listed["nodes"]) == (False, ["a"])

        statuses: list[tuple[int, str | None]] = []

        async def seen(response: Any) -> None:  # the SDK's HTTP client's response
            statuses.append((response.status_code, response.headers.get("Retry-After")))

        http = openai.DefaultAsyncHttpxClient(event_hooks={"response": [seen]})
        client = openai.AsyncOpenAI(
            base_url=b.url + "/v1", api_key="x", max_retries=5, http_client=http
        )
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Say hello."}],
                max_tokens=8,
            )
        completion = raw.parse()
        assert raw.headers["X-Shoal-Served-By"] == "a"
        assert completion.model == MODEL
        assert completion.choices[0].message.content
        # While a loaded it: 503 with Retry-After, retried by the SDK; then 200.
        assert statuses[0][0] == 503
        assert statuses[0][1] is not None
        assert statuses[-1] == (200, None)
        assert all(status == 503 for status, _ in statuses[:-1])

        (loading,) = a.seen(ModelLoading, model=MODEL)
        assert loading.engine == "llama-server"
        await a.wait_for(ModelLoaded, model=MODEL, backend="managed")
        finished = b.seen(RequestFinished, model=MODEL)
        assert [e.status for e in finished] == [s for s, _ in statuses]
        # b now knows a holds it loaded: its advert said so.
        await wait_until(
            lambda: any(
                m["id"] == MODEL and m["loaded"]
                for m in b.node.views.models(local_only=False)["data"]
            ),
            10,
            "b to see the model loaded on a",
        )


async def test_a_hub_file_is_served_by_its_full_name_from_another_node(tmp_path: Path) -> None:
    """A Hub file answers to `org/repo/file.gguf` too, on every node: the name travels in
    the advert as an alias, and the request reaches the holder under the model's id."""
    from tests.models import hf_store

    full = f"HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/{packaged_gguf().name}"
    hf_store(tmp_path / "a" / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF",
             {packaged_gguf().name: packaged_gguf()})  # fmt: skip
    binary, _ = llama_server_command()
    a_models = {"llama_server": binary, "context": 1024, "parallel": 1}
    async with model_node(tmp_path, "a", **a_models) as a, model_node(tmp_path, "b") as b:
        await b.node.admission.meet(a.url, "join")
        await b.wait_for_model(MODEL)
        (listed,) = [m for m in b.node.views.models(local_only=False)["data"] if m["id"] == MODEL]
        assert full in listed.get("aliases", []), listed
        client = openai.AsyncOpenAI(base_url=b.url + "/v1", api_key="x", max_retries=8)
        async with client:
            raw = await client.chat.completions.with_raw_response.create(
                model=full, messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
            )
        assert raw.headers["X-Shoal-Served-By"] == "a"
        assert raw.parse().choices[0].message.content is not None
