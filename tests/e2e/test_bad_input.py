"""Bad requests get OpenAI-shaped errors with the right status, and break nothing."""

from __future__ import annotations

import gzip
import socket
import time
import zlib
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import SMOLLM_ID
from tests.support import NodeProcess, http, openai_client

pytestmark = pytest.mark.engine

CHAT = "/v1/chat/completions"


def _post(node: NodeProcess, path: str, body: bytes) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = http("POST", node.url + path, body, {"Content-Type": "application/json"})
    return status, headers, orjson.loads(raw)


def _assert_openai_error(document: Any, param: str | None = None) -> dict[str, Any]:
    error = document["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return dict(error)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, b"{not json", None),
        (CHAT, b"", None),
        (CHAT, b"[1, 2]", None),
        (CHAT, b'{"model": "m"}', "messages"),
        (CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (CHAT, b'{"model": "m", "messages": []}', "messages"),
        (CHAT, b'{"model": "m", "messages": [{"role": "robot"}]}', "messages[0].role"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "temperature": 7}', "temperature"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "top_p": 1.5}', "top_p"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": "3"}', "max_tokens"),
        (CHAT, b'{"model": "m", "messages": [{"role": "user"}], "stream": "false"}', "stream"),
        (
            CHAT,
            b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/completions", b'{"model": "m"}', "prompt"),
        ("/v1/embeddings", b'{"model": "m", "input": []}', "input"),
    ],
)
def test_bad_body_is_a_400(engine_node: NodeProcess, path: str, body: bytes, param: str) -> None:
    status, _, document = _post(engine_node, path, body)
    assert status == 400
    error = _assert_openai_error(document, param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model_is_a_404(engine_node: NodeProcess) -> None:
    body = orjson.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
    status, headers, document = _post(engine_node, CHAT, body)
    assert status == 404
    assert _assert_openai_error(document, "model")["code"] == "model_not_found"
    assert headers["X-Shoal-Served-By"]  # errors say who answered too


def test_wrong_operation_for_a_model_is_a_400(engine_node: NodeProcess) -> None:
    body = orjson.dumps({"model": SMOLLM_ID, "input": "embed me with a chat model"})
    status, _, document = _post(engine_node, "/v1/embeddings", body)
    assert status == 400
    _assert_openai_error(document, "model")


def test_engine_specific_refusal_passes_through_as_400(engine_node: NodeProcess) -> None:
    body = orjson.dumps(
        {"model": SMOLLM_ID, "messages": [{"role": "user", "content": "hi"}], "n": 3}
    )
    status, headers, document = _post(engine_node, CHAT, body)
    assert status == 400
    assert _assert_openai_error(document, "n")
    assert headers["X-Shoal-Served-By"]


def test_prompt_longer_than_context_is_a_400(engine_node: NodeProcess) -> None:
    long_text = "word " * 5000  # far beyond the 2048-token context
    body = orjson.dumps({"model": SMOLLM_ID, "messages": [{"role": "user", "content": long_text}]})
    status, _, document = _post(engine_node, CHAT, body)
    assert status == 400
    assert _assert_openai_error(document)["code"] == "context_length_exceeded"


def test_unknown_path_and_wrong_method_are_json(engine_node: NodeProcess) -> None:
    status, _, raw = http("GET", engine_node.url + "/v1/nope")
    assert status == 404
    _assert_openai_error(orjson.loads(raw))
    status, _, raw = http("GET", engine_node.url + CHAT)
    assert status == 405
    _assert_openai_error(orjson.loads(raw))


def test_declared_oversize_body_is_refused_before_it_is_sent(engine_node: NodeProcess) -> None:
    host, port = engine_node.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
        )
        # Not one byte of the 100 MB body is sent: the answer must come anyway.
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert _assert_openai_error(orjson.loads(body))["code"] == "payload_too_large"


def test_chunked_oversize_body_is_a_413(engine_node: NodeProcess) -> None:
    # No Content-Length: the node must stop reading at its limit (8 MiB by default).
    big = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * (9 << 20) + b'"}]}'

    def chunks() -> Any:
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    import urllib.request

    request = urllib.request.Request(
        engine_node.url + CHAT, data=chunks(), method="POST",
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    except (ConnectionResetError, BrokenPipeError):
        pytest.fail("the node dropped the connection instead of answering 413")
    assert status == 413
    _assert_openai_error(orjson.loads(raw))


def test_node_still_serves_after_bad_input(engine_node: NodeProcess) -> None:
    client = openai_client(engine_node.url)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], temperature=9
        )
    answer = client.chat.completions.create(
        model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.choices[0].message.content


# -- what the embedded model cannot do is a 400 saying so (issue 9, items 8 and 9) ---------


def test_an_image_to_the_text_only_model_is_a_400_naming_the_part(engine_node: NodeProcess) -> None:
    client = openai_client(engine_node.url)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=SMOLLM_ID,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is it?"}, image]}
            ],
        )
    assert caught.value.param == "messages[0].content[1].type"
    assert caught.value.code == "unsupported_value"
    assert "image_url" in caught.value.message


def test_logprobs_are_refused_as_unsupported(engine_node: NodeProcess) -> None:
    client = openai_client(engine_node.url)
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(
            model=SMOLLM_ID, messages=[{"role": "user", "content": "hi"}], logprobs=True
        )
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model=SMOLLM_ID, prompt="Once", max_tokens=2, logprobs=2)
    for caught in (chat, completion):
        assert (caught.value.param, caught.value.code) == ("logprobs", "unsupported_parameter")


# -- compressed bodies: inflated by the node, within the cap (issue 9, item 10) ------------


def _gzip_bomb(inflated: int) -> bytes:
    """The start of a gzip stream of `inflated` zero bytes, built in milliseconds: after a
    full flush each MiB of zeros compresses to the same bytes (about 1 KiB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (inflated // len(zeros) - 1)


def _proc(pid: int) -> tuple[float, int]:
    """CPU seconds used by the process, and its peak RSS in KiB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = next(
        int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")
    )
    return cpu_s, peak_kib


def _settled_cpu(pid: int, within: float = 15.0) -> float:
    """The process's CPU seconds once it has stopped working: two readings 0.2 s apart
    that differ by less than 0.05 s (a node still inflating a body would not)."""
    deadline = time.monotonic() + within
    last = _proc(pid)[0]
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _proc(pid)[0]
        if now - last < 0.05:
            return now
        last = now
    raise AssertionError(f"process {pid} was still busy after {within} s")


def test_a_gzip_body_is_inflated(engine_node: NodeProcess) -> None:
    body = orjson.dumps(
        {"model": SMOLLM_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    )
    status, _, raw = http(
        "POST",
        engine_node.url + CHAT,
        gzip.compress(body),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"]


def test_a_gzip_bomb_is_refused_at_the_cap_in_bounded_memory_and_time(
    engine_node: NodeProcess,
) -> None:
    """1 MiB that inflates to 1 GiB: 413 once 8 MiB are inflated. Before the node
    inflated bodies itself, aiohttp went on inflating the whole GiB after the 413 to
    drain the connection: 3.8 s of the node's CPU per request."""
    bomb = _gzip_bomb(1 << 30)
    assert len(bomb) < 1.1 * (1 << 20)
    pid = engine_node.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    cpu_before, peak_before = _proc(pid)
    status, _, raw = http(
        "POST",
        engine_node.url + CHAT,
        bomb,
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    cpu_after, peak_after = _settled_cpu(pid), _proc(pid)[1]
    assert status == 413
    assert _assert_openai_error(orjson.loads(raw))["code"] == "payload_too_large"
    assert cpu_after - cpu_before < 1.0
    assert peak_after - peak_before < 24 * 1024  # the 8 MiB cap, and what reads it


@pytest.mark.parametrize("encoding", ["br", "zstd", "gzip, gzip"])
def test_an_encoding_the_node_does_not_inflate_is_a_415(
    engine_node: NodeProcess, encoding: str
) -> None:
    status, headers, raw = http(
        "POST",
        engine_node.url + CHAT,
        b"\x00" * 64,
        {"Content-Type": "application/json", "Content-Encoding": encoding},
    )
    assert status == 415
    assert headers["Accept-Encoding"] == "gzip, deflate"
    assert _assert_openai_error(orjson.loads(raw))["code"] == "unsupported_content_encoding"
