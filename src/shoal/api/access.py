"""Who may use this node's HTTP API (DESIGN §5), checked before any handler runs.

In order, for every request, in one middleware:

1. `Host` allowlist (DNS-rebinding defence): the name the client used must be
   `localhost`, a loopback address, one of this machine's own names or addresses, or in
   `cluster.allowed_hosts`. A web page that rebinds its own domain to this machine still
   sends its domain as `Host`, and is refused (403 `host_not_allowed`). A browser's
   `Origin`, when sent, must pass the same test (403 `origin_not_allowed`): otherwise any
   web page could make a visitor's browser POST to the keyless loopback API.
2. Authorization: the route's declared audience and the caller go to
   `shoal.api.audience.decide`, the one access decision. When it asks for a key, the
   client must send `Authorization: Bearer <key>` (`shoal keys create`; 401
   `invalid_api_key`). Unknown paths need what the client API needs.

Also here: the HTTP header limits for the server (`HEADER_LIMITS`), and a logging
filter that keeps keys and bearer tokens out of the log (`install_log_redaction`). The
middleware also tells the connection when a request head is in and when its answer is
done (`shoal.api.listener.handling`: the header timeout).
Errors are raised as `shoal.errors` exceptions; `shoal.api.errors` formats them.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from typing import TypedDict
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

from shoal.api.audience import Audience, Caller, Verdict, decide
from shoal.api.errors import Handler
from shoal.api.listener import handling
from shoal.errors import Forbidden, ShoalError, Unauthorized
from shoal.mesh import interfaces
from shoal.settings import ClusterMode, Settings
from shoal.trust.keys import KeyRecord, KeyStore

log = logging.getLogger(__name__)


class HeaderLimits(TypedDict):
    max_line_size: int
    max_field_size: int
    max_headers: int


#: Keyword arguments for `web.AppRunner(...)`: aiohttp refuses a request beyond these
#: with 400 before any handler runs, so a client cannot make the node buffer headers.
HEADER_LIMITS: HeaderLimits = {
    # The request target (path and query). Shoal's paths are under 100 bytes and take no
    # long queries; 4 KiB is generous and stops URL-stuffing.
    "max_line_size": 4096,
    # One header line. An API key is ~52 bytes, but browsers send every cookie set for
    # `localhost` by any local web app; 8 KiB is what nginx and aiohttp allow by default.
    "max_field_size": 8190,
    # Header count. SDKs send ~10 and browsers ~20; 64 × 8 KiB bounds a request's headers
    # at 512 KiB (aiohttp's default of 128 allows twice that for no use).
    "max_headers": 64,
}

#: What a request learnt about its caller, for handlers (the peer state exchange).
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)
# The API key a LAN client's request was let in by (none from this machine or a peer).
API_KEY: web.RequestKey[KeyRecord] = web.RequestKey("api_key", KeyRecord)

LOOPBACK_NAMES = frozenset({"localhost"})
_NAME = re.compile(r"[a-z0-9_~-]+(\.[a-z0-9_~-]+)*")
_PORT = re.compile(r"[0-9]{1,5}")
_MAX_REMEMBERED_REFUSALS = 256


# -- Host and Origin --------------------------------------------------------------------


def normalise_host(name: str) -> str | None:
    """A bare host name or address in one canonical form, or None if it is neither.

    Lowercase, without a trailing dot; IP addresses in compressed form, IPv6 without its
    zone (`fe80::1%eth0` → `fe80::1`), IPv4-mapped IPv6 as plain IPv4.
    """
    name = name.strip().lower().removesuffix(".")
    address, percent, _zone = name.partition("%")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return name if _NAME.fullmatch(name) else None
    if isinstance(ip, ipaddress.IPv4Address):
        return None if percent else ip.compressed
    return (ip.ipv4_mapped or ip).compressed


@functools.lru_cache(maxsize=1024)  # a client sends the same Host on every request
def host_of(header: str) -> str | None:
    """The host in a `Host` header (`name`, `name:port`, `[v6]`, `[v6]:port`), normalised;
    None when the header is malformed (an unbracketed IPv6 address included)."""
    header = header.strip()
    if header.startswith("["):
        name, bracket, rest = header[1:].partition("]")
        if not bracket or ":" not in name:
            return None
    elif header.count(":") > 1:
        return None
    else:
        name, colon, port = header.partition(":")
        rest = colon + port
    if rest and not (rest[0] == ":" and _PORT.fullmatch(rest[1:])):
        return None
    return normalise_host(name) if name else None


@functools.lru_cache(maxsize=1024)  # on every request: parse each address once
def is_loopback_host(host: str) -> bool:
    """Whether a normalised host is `localhost` or a loopback address."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=1024)
def is_loopback_address(remote: str | None) -> bool:
    """Whether a request's remote address is on this machine (127/8, ::1, mapped 127/8).

    Anything unknown (no address, a Unix socket) is not loopback: fail closed.
    """
    host = normalise_host(remote) if remote else None
    return host is not None and host not in LOOPBACK_NAMES and is_loopback_host(host)


class MachineHosts:
    """This machine's names and addresses, for the Host allowlist.

    Re-read at most every `ttl_s` seconds, so an address that DHCP hands out later is
    accepted soon after. Names: the hostname, its first label, both with `.local`
    (mDNS), the configured bind host, and `extra` (e.g. the node's mDNS server name).
    """

    def __init__(self, settings: Settings, extra: Iterable[str] = (), ttl_s: float = 5.0) -> None:
        self._settings = settings
        self._extra = tuple(extra)
        self._ttl_s = ttl_s
        self._hosts: set[str] = set()
        self._read_at: float | None = None

    def __call__(self) -> set[str]:
        now = time.monotonic()
        if self._read_at is None or now - self._read_at >= self._ttl_s:
            self._hosts = self._read()
            self._read_at = now
        return self._hosts

    def _read(self) -> set[str]:
        names = {*self._extra, self._settings.host, self._settings.bind_host}
        hostname = socket.gethostname()
        for name in (hostname, hostname.split(".")[0]):
            names |= {name, f"{name}.local"}
        names |= {address.compressed for address in interfaces.local_addresses()}
        return {host for name in names if name and (host := normalise_host(name))}


# -- the middleware ---------------------------------------------------------------------


def bearer_token(request: web.Request) -> str | None:
    """The token of the one `Authorization: Bearer` header, or None."""
    values = request.headers.getall("Authorization", [])
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def peer_port_caller(
    peer_of_connection: Callable[[asyncio.Transport], str | None],
    is_loopback: Callable[[str | None], bool] = is_loopback_address,
) -> Callable[[web.Request], Caller]:
    """Describe a request's caller: its address, and on the mutual-TLS peer port, the
    paired node its certificate proves (`peer_of_connection`, the trust service's)."""

    # On the API port a caller is one of two: no need to make one per request.
    local, lan = Caller(True, False, None), Caller(False, False, None)

    def caller_of(request: web.Request) -> Caller:
        transport = request.transport
        loopback = is_loopback(request.remote)
        # Not isinstance(transport, asyncio.Transport): uvloop's transports are not.
        if transport is None or not transport.get_extra_info("ssl_object"):
            return local if loopback else lan
        return Caller(loopback, peer_port=True, peer=peer_of_connection(transport))

    return caller_of


def access_middleware(
    settings: Settings,
    keys: KeyStore,
    own_hosts: Callable[[], set[str]],
    *,
    audience_of: Callable[[web.Request], Audience],
    caller_of: Callable[[web.Request], Caller],
    cluster_mode: Callable[[], ClusterMode],
) -> Middleware:
    """The aiohttp middleware enforcing the Host allowlist, then `decide()`'s verdict.

    Put it after `errors_middleware` (which formats what it raises). `audience_of` gives
    the audience the matched route declares; `caller_of` describes the caller
    (`peer_port_caller`); `cluster_mode` is read per request (the trust service's mode,
    held as state: no file is read on the request path).
    """
    configured = {h for entry in settings.cluster.allowed_hosts if (h := host_of(entry))}
    refused_hosts: set[str] = set()
    broken_store: list[str] = []  # the last key-file error logged, to log each once

    def allowed(host: str | None) -> bool:
        if host is None:
            return False
        if is_loopback_host(host) or host in configured:
            return True
        own = own_hosts()
        return host in own or host in {normalise_host(h) for h in own}

    def refuse_host(what: str, value: str, code: str) -> Forbidden:
        shown = value[:100]
        if len(refused_hosts) < _MAX_REMEMBERED_REFUSALS and shown not in refused_hosts:
            refused_hosts.add(shown)
            log.warning(
                "refused a request with %s %r: not this machine; if it is, add it to "
                "cluster.allowed_hosts",
                what,
                shown,
            )
        error = Forbidden(
            f"the {what} {shown!r} does not name this machine; the node's operator can add "
            "it to cluster.allowed_hosts (this check defends against DNS rebinding)"
        )
        error.code = code
        return error

    def check_host(request: web.Request) -> None:
        hosts = request.headers.getall("Host", [])
        if len(hosts) > 1:
            raise refuse_host("Host header", ", ".join(hosts), "host_not_allowed")
        if not hosts:
            if request.version < (1, 1):
                return  # HTTP/1.0 may omit Host; browsers never do, so no rebinding here
            error = Forbidden("the request has no Host header")
            error.code = "host_not_allowed"
            raise error
        if not allowed(host_of(hosts[0])):
            raise refuse_host("Host header", hosts[0], "host_not_allowed")
        for origin in request.headers.getall("Origin", []):
            try:
                origin_host = urlsplit(origin.strip()).hostname
            except ValueError:
                origin_host = None
            if not allowed(normalise_host(origin_host) if origin_host else None):
                raise refuse_host("Origin", origin, "origin_not_allowed")

    def check_key(request: web.Request) -> KeyRecord:
        token = bearer_token(request)
        if token is None:
            raise Unauthorized(
                "this node needs an API key from clients on the network: send "
                "'Authorization: Bearer <key>' (the node's operator makes one with "
                "'shoal keys create NAME')"
            )
        try:
            record = keys.verify(token)
        except ShoalError as exc:  # a corrupt or unreadable key file: refuse, fail closed
            if broken_store[-1:] != [exc.message]:
                broken_store[:] = [exc.message]
                log.error("cannot check API keys: %s", exc.message)
            raise ShoalError(
                "this node cannot check API keys now; its operator will find why in its log"
            ) from None
        broken_store.clear()
        if record is None:
            raise Unauthorized("the API key is not valid (wrong, or revoked)")
        return record

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        # The head is in: its connection's header timer stops until the answer is done.
        with handling(request):
            check_host(request)
            caller = caller_of(request)
            verdict = decide(audience_of(request), caller, cluster_mode())
            if verdict is Verdict.NEED_KEY:
                request[API_KEY] = check_key(request)  # its weight, when requests queue
            elif verdict is not Verdict.ALLOW:
                raise Forbidden(_REFUSALS[verdict])
            request[CALLER] = caller
            return await handler(request)

    return access


_REFUSALS = {
    Verdict.NOT_PAIRED: "this node does not trust your key",
    Verdict.LOCAL_ONLY: "this operation is only allowed from the node's own machine",
    Verdict.PEER_ONLY: "node-to-node calls need the peer port and a paired node's key",
}


# -- keeping secrets out of the log -----------------------------------------------------

_SECRETS = re.compile(r"shoal-(sk|ct)-[A-Za-z0-9_-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"\\]+")


def redact(text: str) -> str:
    """`text` with API keys, cluster secrets and bearer tokens replaced by a marker."""
    if "shoal-" in text:
        text = _SECRETS.sub(r"shoal-\1-[redacted]", text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(r"\1[redacted]", text)
    return text


class RedactSecrets(logging.Filter):
    """A handler filter: no log line carries a key, secret or bearer token.

    aiohttp logs a malformed request with the offending request line quoted, which can be
    an `Authorization` header; such records become one line without the quote.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            args = (record.getMessage(), error.code, type(error).__name__)
            record.msg = "%s: malformed HTTP request refused with %d (%s; not quoted here)"
            record.args = args
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Add `RedactSecrets` to every handler of `logger` (default: the root logger).

    Call after logging is configured: filters on handlers see every propagated record.
    """
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
