"""`shoal serve --log-format json` (issue 12, item 7): every line a JSON object, and the
request line's fields as JSON, from a real `shoal serve`."""

from __future__ import annotations

import json
from pathlib import Path

import orjson

from tests.support import http, start_node


def test_log_format_json_writes_one_object_per_line_with_the_request_fields(
    tmp_path: Path,
) -> None:
    node = start_node(
        tmp_path, "--name", "jsonlog", "--no-embedded", "--log-format", "json", wait_backend=None
    )
    try:
        body = orjson.dumps(
            {"model": "nobody-has-it", "messages": [{"role": "user", "content": "hi"}]}
        )
        status, _, _ = http(
            "POST", node.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        assert status == 404
    finally:
        node.stop()
    lines = [line for line in node.log().splitlines() if line.strip()]
    documents = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= d.keys() for d in documents)
    assert any("listening on" in d["message"] for d in documents)
    (request,) = [d["request"] for d in documents if "request" in d]
    assert (request["model"], request["status"], request["outcome"]) == (
        "nobody-has-it", 404, "failed",
    )  # fmt: skip
    assert request["route"] is None and request["node"] is None
    assert request["total_ms"] >= 0
    assert any(d["message"] == "shoal node 'jsonlog' stopped" for d in documents)
