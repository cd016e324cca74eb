"""A stranger on the LAN with no key, attacking one node, driven by the test over stdin.

It runs inside its own host of a `Lan`, so the test process stays outside the fight. One
JSON command a line in, one JSON answer a line out. Attacks that last (`idle`,
`slowloris`, `trickle`, `flood`) run in the background under a name; `status` reports
on one and `stop` ends it. Every attack is bounded: by a count, and by `limit_s`.

    {"cmd": "idle", "name", "host", "port", "count", "data", "reopen_s", "limit_s"}
        `count` connections that send `data` (a partial request line) and wait; with
        `reopen_s`, a connection the node closes is opened again that much later
    {"cmd": "slowloris", "name", "host", "port", "count", "interval_s", "limit_s"}
        a request head sent one byte every `interval_s`
    {"cmd": "trickle", "name", "host", "port", "path", "interval_s", "limit_s"}
        a chunked request body, one chunk every `interval_s`, never ending
    {"cmd": "raw", "host", "port", "data" | "bomb": {"path", "inflated", "headers"},
     "within_s"}                      bytes sent by hand; the answer parsed
    {"cmd": "hellos", "url", "count", "padding", "concurrency"}
        pairing hellos padded with an unknown field
    {"cmd": "hello", "url", "fields", "name"}  one hello with fields replaced
    {"cmd": "pair", "url", "name"}    one real pairing handshake with a chosen name
    {"cmd": "flood", "name", "url", "rate", "limit_s"}
        real pairing handshakes from fresh identities, `rate` a second
    {"cmd": "wrong_secret", "url", "count"}  handshakes with a wrong cluster secret
    {"cmd": "status" | "stop", "name"}
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import statistics
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from shoal.mesh import identity
from shoal.protocol import HELLO_PATH
from shoal.settings import Settings
from shoal.trust import handshake
from shoal.trust.handshake import HandshakeError
from shoal.trust.secret import new_secret, write_secret
from shoal.trust.service import Trust

CONNECT_TIMEOUT_S = 3.0
HELD_S = 1.0  # a connection the node refuses is closed within ms; one it keeps, is not
MIB = 1 << 20
PLAIN_SESSION = aiohttp.ClientSession  # before `wrong_secret` wraps it


@dataclass
class Connection:
    opened: float
    closed: float | None = None  # when the node closed it (EOF or reset)
    answered: float | None = None  # when its first byte came
    answer: bytes = b""  # what the node said before closing, if anything


@dataclass
class Attack:
    kind: str
    started: float = field(default_factory=time.monotonic)
    connections: list[Connection] = field(default_factory=list)
    connect_errors: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    expected: int = 0  # connections to try in the first round
    tried_all: asyncio.Event = field(default_factory=asyncio.Event)

    def tried(self) -> None:
        if len(self.connections) + self.connect_errors.total() >= self.expected:
            self.tried_all.set()

    def statistics(self) -> dict[str, Any]:
        closed = [c for c in self.connections if c.closed is not None]
        lifetimes = [c.closed - c.opened for c in closed if c.closed is not None]
        answers = Counter(c.answer.split(b"\r\n", 1)[0].decode(errors="replace") for c in closed)
        delays = [c.answered - c.opened for c in self.connections if c.answered is not None]
        now = time.monotonic()
        held = sum(c.closed is None and now - c.opened > HELD_S for c in self.connections)
        return {
            "kind": self.kind,
            "seconds": time.monotonic() - self.started,
            "connected": len(self.connections),
            "open": len(self.connections) - len(closed),
            "held": held,  # open for over HELD_S: kept by the node, not being refused
            "closed_by_node": len(closed),
            "lifetime_p50_s": statistics.median(lifetimes) if lifetimes else None,
            "lifetime_max_s": max(lifetimes) if lifetimes else None,
            "answers": dict(answers),
            "answered_max_s": max(delays) if delays else None,
            "connect_errors": dict(self.connect_errors),
            "outcomes": dict(self.outcomes),
            "running": sum(not t.done() for t in self.tasks),
        }

    async def stop(self) -> dict[str, Any]:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in list(self.writers):
            writer.transport.abort()
        return self.statistics()


async def _connect(
    attack: Attack, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Connection] | None:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        attack.connect_errors[type(exc).__name__] += 1
        attack.tried()
        return None
    connection = Connection(time.monotonic())
    attack.connections.append(connection)
    attack.writers.add(writer)
    attack.tried()
    return reader, writer, connection


async def _until_closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: Connection
) -> None:
    """Read whatever the node says until it closes the connection."""
    try:
        while chunk := await reader.read(4096):
            if connection.answered is None:
                connection.answered = time.monotonic()
            if len(connection.answer) < 512:
                connection.answer += chunk
    except OSError:
        pass
    connection.closed = time.monotonic()


async def _idle_slot(attack: Attack, cmd: dict[str, Any], deadline: float) -> None:
    data = cmd["data"].encode()
    while time.monotonic() < deadline:
        opened = await _connect(attack, cmd["host"], cmd["port"])
        if opened is not None:
            reader, writer, connection = opened
            with contextlib.suppress(OSError):
                writer.write(data)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await _until_closed(reader, writer, connection)
            writer.transport.abort()
            attack.writers.discard(writer)
        if cmd.get("reopen_s") is None:
            return
        await asyncio.sleep(cmd["reopen_s"])


async def _slowloris_slot(attack: Attack, cmd: dict[str, Any], deadline: float) -> None:
    opened = await _connect(attack, cmd["host"], cmd["port"])
    if opened is None:
        return
    reader, writer, connection = opened
    head = f"GET /healthz HTTP/1.1\r\nHost: {cmd['host']}\r\nX-Slow: " + "a" * 10_000
    watching = asyncio.ensure_future(_until_closed(reader, writer, connection))
    try:
        for byte in head.encode():
            if watching.done() or time.monotonic() >= deadline:
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(cmd["interval_s"])
    except OSError:
        pass
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await watching
    watching.cancel()
    writer.transport.abort()


async def _trickle(attack: Attack, cmd: dict[str, Any], deadline: float) -> None:
    opened = await _connect(attack, cmd["host"], cmd["port"])
    if opened is None:
        return
    reader, writer, connection = opened
    writer.write(
        f"POST {cmd['path']} HTTP/1.1\r\nHost: {cmd['host']}\r\nContent-Type: application/json"
        "\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    watching = asyncio.ensure_future(_until_closed(reader, writer, connection))
    try:
        while not watching.done() and time.monotonic() < deadline:
            writer.write(b"1\r\n \r\n")
            await asyncio.sleep(cmd["interval_s"])
    except OSError:
        pass
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
            await watching
    watching.cancel()
    writer.transport.abort()


# -- one request by hand ------------------------------------------------------------------


@functools.cache
def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of `inflated` zero bytes (a multiple of 1 MiB), about 1/1000 of that.

    Built in well under a second: after a full flush the compressor starts afresh, so
    every further MiB of zeros compresses to the same bytes; the trailer's CRC is computed
    on its own.
    """
    zeros = bytes(MIB)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[:-8]  # the final block, without its (wrong) trailer
    crc = 0
    for _ in range(inflated // MIB):
        crc = zlib.crc32(zeros, crc)
    trailer = struct.pack("<II", crc, inflated & 0xFFFFFFFF)
    return first + again * (inflated // MIB - 1) + end + trailer


def parse_answer(raw: bytes) -> dict[str, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return {"status": status, "headers": headers, "body": body.decode(errors="replace")[:2000]}


async def raw(cmd: dict[str, Any]) -> dict[str, Any]:
    if "bomb" in cmd:
        bomb = cmd["bomb"]
        body = gzip_bomb(bomb["inflated"])
        extra = "".join(f"{k}: {v}\r\n" for k, v in bomb.get("headers", {}).items())
        data = (
            f"POST {bomb['path']} HTTP/1.1\r\nHost: {cmd['host']}\r\n"
            f"Content-Type: application/json\r\nContent-Encoding: gzip\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
    else:
        data = cmd["data"].encode()
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(cmd["host"], cmd["port"])
    answer = b""
    try:
        with contextlib.suppress(OSError):  # the node may answer and close before the end
            writer.write(data)
            await writer.drain()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(cmd.get("within_s", 10)):
                while chunk := await reader.read(65536):
                    answer += chunk
                    if b"\r\n\r\n" in answer and _complete(answer):
                        break
    finally:
        writer.transport.abort()
    return {**parse_answer(answer), "seconds": time.monotonic() - started, "sent": len(data)}


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


# -- the handshake, as a stranger ----------------------------------------------------------


def stranger(name: str, mode: str = "pairing", secret: str | None = None) -> Trust:
    """A fresh identity with its own data dir, as a new node would have."""
    home = Path(tempfile.mkdtemp(prefix="stranger-"))
    if secret is not None:
        write_secret(home, secret)
    settings = Settings(data_dir=home, name="stranger", lan=True, cluster={"mode": mode})
    trust = Trust(identity.load_or_create(home), settings, peer_port=11451)
    trust.name = name  # a name the node must show escaped, chosen by the stranger
    return trust


def hello_document(trust: Trust, mode: str = "pairing") -> dict[str, object]:
    document = trust._hello(mode, handshake.new_nonce()).wire()  # type: ignore[arg-type]
    return dict(document)


async def post_json(url: str, document: object) -> tuple[int, str]:
    async with (
        PLAIN_SESSION(timeout=aiohttp.ClientTimeout(10)) as session,
        session.post(url, data=json.dumps(document)) as response,
    ):
        return response.status, (await response.read()).decode(errors="replace")[:500]


async def hellos(cmd: dict[str, Any]) -> dict[str, Any]:
    trust = stranger("padded")
    gate = asyncio.Semaphore(cmd.get("concurrency", 16))
    statuses: Counter[str] = Counter()
    started = time.monotonic()

    async def one() -> None:
        document = {**hello_document(trust), "padding": "x" * cmd["padding"]}
        async with gate:
            try:
                status, _ = await post_json(cmd["url"] + HELLO_PATH, document)
                statuses[str(status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                statuses[type(exc).__name__] += 1

    await asyncio.gather(*(one() for _ in range(cmd["count"])))
    return {"statuses": dict(statuses), "seconds": time.monotonic() - started}


async def one_hello(cmd: dict[str, Any]) -> dict[str, Any]:
    document = {**hello_document(stranger("probe")), **cmd.get("fields", {})}
    if "name" in cmd:
        document["name"] = cmd["name"]
    status, body = await post_json(cmd["url"] + HELLO_PATH, document)
    return {"status": status, "body": body}


async def pair(url: str, name: str) -> str:
    """One real pairing handshake as initiator; what the node made of it."""
    try:
        met = await stranger(name).admit(url)
    except HandshakeError as exc:
        return f"refused: {exc}"[:300]
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return f"error: {type(exc).__name__}"
    return str(met.node.state)


async def _flood(attack: Attack, cmd: dict[str, Any], deadline: float) -> None:
    index = 0
    while time.monotonic() < deadline:
        index += 1
        outcome = await pair(cmd["url"], f"flood-{index}")
        attack.outcomes[outcome.split(":")[0] if outcome.startswith("error") else outcome] += 1
        await asyncio.sleep(1 / cmd["rate"])


async def wrong_secret(cmd: dict[str, Any]) -> dict[str, Any]:
    """Handshakes with a wrong cluster secret, each carried through to the node's own
    check (our side's check of the node's proof, if the protocol has one, is skipped),
    and the HTTP status of every message the node answered."""
    statuses: list[tuple[str, int, str | None]] = []

    async def on_end(session: Any, context: Any, params: aiohttp.TraceRequestEndParams) -> None:
        path = params.url.path.rsplit("/", 1)[-1]
        statuses.append((path, params.response.status, params.response.headers.get("Retry-After")))

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    aiohttp.ClientSession = functools.partial(PLAIN_SESSION, trace_configs=[trace])  # type: ignore[misc]
    if hasattr(handshake, "check_secret_proof"):
        handshake.check_secret_proof = lambda *args: None
    outcomes: Counter[str] = Counter()
    try:
        for _ in range(cmd["count"]):
            trust = stranger("guesser", mode="secret", secret=new_secret())
            try:
                await trust.admit(cmd["url"])
                outcomes["admitted"] += 1
            except HandshakeError as exc:
                outcomes[str(exc)[:120]] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                outcomes[type(exc).__name__] += 1
    finally:
        aiohttp.ClientSession = PLAIN_SESSION  # type: ignore[misc]
    return {"statuses": statuses, "outcomes": dict(outcomes)}


# -- the loop ------------------------------------------------------------------------------


class Attacker:
    def __init__(self) -> None:
        self.attacks: dict[str, Attack] = {}

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        kind = cmd["cmd"]
        deadline = time.monotonic() + float(cmd.get("limit_s", 30))
        if kind in ("idle", "slowloris", "trickle", "flood"):
            attack = self.attacks[cmd["name"]] = Attack(kind, expected=cmd.get("count", 1))
            slots = {"idle": _idle_slot, "slowloris": _slowloris_slot}
            if kind in slots:
                for _ in range(cmd["count"]):
                    attack.tasks.append(asyncio.ensure_future(slots[kind](attack, cmd, deadline)))
            elif kind == "trickle":
                attack.tasks.append(asyncio.ensure_future(_trickle(attack, cmd, deadline)))
            else:
                attack.tasks.append(asyncio.ensure_future(_flood(attack, cmd, deadline)))
            if kind == "idle":  # answer once every connection was tried
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(cmd.get("settle_s", 10.0)):
                        await attack.tried_all.wait()
            return attack.statistics()
        if kind == "status":
            return self.attacks[cmd["name"]].statistics()
        if kind == "stop":
            return await self.attacks.pop(cmd["name"]).stop()
        if kind == "raw":
            return await raw(cmd)
        if kind == "hellos":
            return await hellos(cmd)
        if kind == "hello":
            return await one_hello(cmd)
        if kind == "pair":
            return {"outcome": await pair(cmd["url"], cmd["name"])}
        if kind == "wrong_secret":
            return await wrong_secret(cmd)
        raise ValueError(f"unknown command {kind!r}")


async def main() -> None:
    # Enough descriptors for the idle attack (the hard limit allows it as root).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    attacker = Attacker()
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        try:
            answer = await attacker.handle(json.loads(line))
        except Exception as exc:  # report it; the test decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    for attack in list(attacker.attacks.values()):
        await attack.stop()
    os._exit(0)  # the executor's stdin thread would keep the process alive


if __name__ == "__main__":
    asyncio.run(main())
