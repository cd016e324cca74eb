"""The node's trust material: the handshake's messages, the trust store, the TLS contexts.

Handshakes run over the plain API port (they must work before any trust exists);
everything else between nodes runs over mutual TLS on the peer port, where only paired
nodes' certificates are accepted. See docs/protocol.md. Deciding *when* a node becomes
trusted or stops being trusted, and telling the rest of the node, is
`shoal.trust.admission`'s job; this module only keeps the books and the keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import ssl
import time
import weakref
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import ValidationError

from shoal.errors import BusyError
from shoal.mesh.identity import Identity, node_id_of
from shoal.protocol import CONFIRM_PATH, HELLO_PATH, error_message
from shoal.settings import ClusterMode, Settings
from shoal.trust import certs, handshake, pake
from shoal.trust.handshake import HandshakeError
from shoal.trust.pending import PendingFull, address_of
from shoal.trust.secret import read_secret
from shoal.trust.store import TrustedNode, TrustState, TrustStore
from shoal.trust.strikes import Strikes, source_of

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
REPLY_MAX_BYTES = 16 * 1024  # a reply is about 1.5 KiB; the same cap as the responder's
_RESPONDER, _INITIATOR = b"responder", b"initiator"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Met:
    """A completed handshake: the node's entry now, and its state before (None: new);
    the pending requests dropped to let it wait; as responder in secret mode, our proof
    for the confirm reply."""

    node: TrustedNode
    previous: TrustState | None
    dropped: tuple[TrustedNode, ...] = ()
    proof: bytes | None = None

    @property
    def changed(self) -> bool:
        return self.node.state is not self.previous


class Trust:
    def __init__(self, identity: Identity, settings: Settings, peer_port: int) -> None:
        self.identity = identity
        self.name = settings.name
        self.api_port = settings.port  # the bound port, set by the node once it listens
        self._settings = settings
        self._data_dir = settings.data_dir
        self.peer_port = peer_port
        self.cert = certs.load_or_create_cert(identity, settings.data_dir)
        self.store = TrustStore(settings.data_dir / "trust.json")
        # Open handshakes (hellos answered, confirms awaited), each keeping only the few
        # validated fields the confirm needs (`handshake.Opened`, at most ~4.8 KiB): at
        # most MAX_OPEN_HANDSHAKES (256) × 4.8 KiB ≈ 1.2 MiB, whatever strangers send.
        self._nonces = handshake.NonceBook.empty()
        # Wrong cluster secrets per source address, both ways (`shoal.trust.strikes`).
        self.strikes = Strikes()
        self._own_nonces: set[bytes] = set()  # hellos we are sending now (to tell self apart)
        # Where another live node presenting our own ID was seen (a copied data dir).
        self.duplicate_seen_at: str | None = None
        self._clients: dict[str, ssl.SSLContext] = {}
        self.server_context = self._fresh_server_context()
        # Live inbound TLS connections per peer, to cut them when it is unpaired.
        self._connections: dict[str, weakref.WeakSet[asyncio.Transport]] = {}
        self._by_connection: weakref.WeakKeyDictionary[asyncio.Transport, str] = (
            weakref.WeakKeyDictionary()
        )
        self._secret: str | None = None
        self.mode: ClusterMode = "open"
        self.refresh_mode()

    # -- mode ---------------------------------------------------------------------------

    def refresh_mode(self) -> ClusterMode:
        """Read the cluster secret file again and settle the mode (held as state: the
        request path reads `mode`, never the file). Called before every handshake, so
        `shoal token create` takes effect without a restart.

        Explicit config wins; else a cluster secret on disk means secret mode; else
        open when bound to loopback (no other machine can reach us), pairing otherwise.
        """
        self._secret = read_secret(self._data_dir)
        if self._settings.cluster.mode is not None:
            self.mode = self._settings.cluster.mode
        elif self._secret:
            self.mode = "secret"
        else:
            host = self._settings.bind_host
            loopback = host == "localhost" or (
                _is_ip(host) and ipaddress.ip_address(host).is_loopback
            )
            self.mode = "open" if loopback else "pairing"
        return self.mode

    def secret(self) -> str | None:
        return self._secret

    def advert(self) -> dict[str, str]:
        """What mDNS may say: mode, peer port and a short fingerprint of the secret."""
        fields = {"m": self.mode, "pp": str(self.peer_port)}
        secret = self.secret() if self.mode == "secret" else None
        if secret:
            fields["fp"] = handshake.secret_fingerprint(secret)
        return fields

    # -- who is trusted -----------------------------------------------------------------

    def is_paired(self, node_id: str) -> bool:
        return self.store.state(node_id) is TrustState.PAIRED

    def peer_url(self, node_id: str, host: str) -> str:
        node = self.store.get(node_id)
        port = node.peer_port if node and node.peer_port else self.peer_port
        return f"https://{host}:{port}"

    def client_context(self, node_id: str) -> ssl.SSLContext:
        context = self._clients.get(node_id)
        if context is None:
            node = self.store.get(node_id)
            if node is None or node.state is not TrustState.PAIRED or not node.cert:
                raise HandshakeError("not paired with that node")
            context = certs.client_context(self.identity, self.cert, node.cert.encode())
            self._clients[node_id] = context
        return context

    def peer_of(self, der_cert: bytes | None) -> str | None:
        """The paired node a TLS client certificate belongs to, or None."""
        if not der_cert:
            return None
        node_id = node_id_of(certs.public_key_of_cert(der_cert))
        return node_id if self.is_paired(node_id) else None

    def peer_of_connection(self, transport: asyncio.Transport) -> str | None:
        """The paired node at the other end of a peer-port connection (checked once per
        connection: revoking a node aborts its connections, so the answer cannot go stale).
        """
        known = self._by_connection.get(transport)
        if known is not None:
            return known
        ssl_object = transport.get_extra_info("ssl_object")
        node_id = self.peer_of(ssl_object.getpeercert(binary_form=True)) if ssl_object else None
        if node_id is not None:
            self._by_connection[transport] = node_id
            self._connections.setdefault(node_id, weakref.WeakSet()).add(transport)
        return node_id

    # -- the operator's decisions -------------------------------------------------------

    def accept(self, node: TrustedNode) -> None:
        self.store.set_state(node.node_id, TrustState.PAIRED)
        self.server_context.load_verify_locations(cadata=node.cert)

    def revoke(self, node: TrustedNode, *, forget: bool) -> None:
        """Decline, unpair or forget: a fresh server context without its certificate,
        and its live connections cut at once. The caller restarts the peer listener
        with the new context (`server_context`)."""
        if forget:
            self.store.forget(node.node_id)
        else:
            self.store.set_state(node.node_id, TrustState.UNPAIRED)
        self._clients.pop(node.node_id, None)
        self.server_context = self._fresh_server_context()
        for transport in list(self._connections.pop(node.node_id, ())):
            self._by_connection.pop(transport, None)
            transport.abort()

    def _fresh_server_context(self) -> ssl.SSLContext:
        trusted = [n.cert.encode() for n in self.store.paired() if n.cert]
        return certs.server_context(self.identity, self.cert, trusted)

    # -- the handshake, as initiator ----------------------------------------------------

    async def admit(self, api_url: str) -> Met:
        """Run the handshake with the node at `api_url`; its entry in the store."""
        mode, secret = self.refresh_mode(), self.secret()
        nonce_a = handshake.new_nonce()
        self._own_nonces.add(nonce_a)
        try:
            return await self._admit(api_url, mode, secret, nonce_a)
        finally:
            self._own_nonces.discard(nonce_a)

    async def _admit(
        self, api_url: str, mode: ClusterMode, secret: str | None, nonce_a: bytes
    ) -> Met:
        share = None  # ours, in secret mode: CPace on the cluster secret
        if mode == "secret":
            if secret is None:
                raise HandshakeError("this node has no cluster secret (shoal token create)")
            share = handshake.key_share(secret, self.identity.public_key, nonce_a)
        source = source_of(urlsplit(api_url).hostname or api_url)
        if share is not None:
            self._check_strikes_with(source)
        timeout = aiohttp.ClientTimeout(HANDSHAKE_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            reply = await _say_hello(session, api_url, self._hello(mode, nonce_a, share))
            if reply.mode != mode:
                raise HandshakeError(f"cluster mode mismatch: we are {mode}, they are {reply.mode}")
            shares = (share.public, reply.pake or b"") if share else None
            pk_a, pk_b = self.identity.public_key, reply.public_key
            t = handshake.transcript(mode, pk_a, pk_b, nonce_a, reply.nonce, shares)
            handshake.check_signature(pk_b, _RESPONDER, t, reply.signature)
            key = None
            if share is not None:
                key = handshake.session_key(share, reply.pake or b"", nonce_a, initiator=True)
                # Our proof is one guess at the secret for whoever answers: counted
                # against that address until it proves the secret in turn.
                self._check_strikes_with(source)
                self.strikes.failed(source, time.monotonic())
            confirm = handshake.Confirm(
                nonce=reply.nonce,
                signature=self.identity.sign(_INITIATOR + b"|" + t),
                proof=handshake.key_proof(key, _INITIATOR, t) if key else None,
            )
            answer = handshake.parse(
                handshake.ConfirmReply,
                await _post(session, api_url + CONFIRM_PATH, confirm.wire()),
            )
        if key is not None:
            try:
                handshake.check_key_proof(key, _RESPONDER, t, answer.proof or b"")
            except HandshakeError:
                raise HandshakeError(
                    "cluster secret mismatch: the other node did not prove the secret"
                ) from None
            self.strikes.cleared(source)
        opened = handshake.Opened(pk_b, reply.nonce, reply.name, reply.cert, 0, reply.peer_port)
        try:
            return self._met(opened, api_url, mode)
        except PendingFull as exc:
            raise HandshakeError(str(exc)) from None

    def _check_strikes_with(self, source: str) -> None:
        """As initiator: no proof of ours for a source out of tries."""
        wait = self.strikes.wait(source, time.monotonic())
        if wait > 0:
            raise HandshakeError(
                f"too many failed secret handshakes with {source}; next try in {math.ceil(wait)} s"
            )

    def _check_strikes_from(self, source: str, now: float) -> None:
        """As responder: no proof checked for a source out of tries (429, Retry-After)."""
        wait = self.strikes.wait(source, now) if self.mode == "secret" else 0.0
        if wait > 0:
            raise BusyError(
                "too many wrong cluster secrets from your address; try again in "
                f"{math.ceil(wait)} s",
                retry_after=wait,
            )

    def _hello(
        self, mode: ClusterMode, nonce_a: bytes, share: pake.KeyShare | None = None
    ) -> handshake.Hello:
        try:
            return handshake.Hello(
                v=handshake.VERSION,
                mode=mode,
                node_id=self.identity.node_id,
                name=self.name,
                public_key=self.identity.public_key,
                cert=self.cert.decode(),
                api_port=self.api_port,
                peer_port=self.peer_port,
                nonce=nonce_a,
                pake=share.public if share else None,
            )
        except ValidationError as exc:  # our own settings: the name, or unbound ports
            raise HandshakeError(f"this node cannot say hello: {exc.errors()[0]['msg']}") from None

    # -- the handshake, as responder ----------------------------------------------------

    def hello(self, doc: object, remote_ip: str) -> dict[str, object]:
        """Answer a hello (decoded JSON, not yet checked) from `remote_ip`; HandshakeError
        to refuse it, BusyError while that address is out of tries at the secret."""
        handshake.check_version(doc, "hello")
        hello = handshake.parse(handshake.Hello, doc)
        mode, secret = self.refresh_mode(), self.secret()
        if hello.mode != mode:
            raise HandshakeError(f"cluster mode mismatch: we are {mode}, you are {hello.mode}")
        if mode == "secret" and secret is None:
            raise HandshakeError("this node has no cluster secret yet")
        self._check_strikes_from(source_of(remote_ip), time.monotonic())
        pk_a, nonce_a = hello.public_key, hello.nonce
        if pk_a == self.identity.public_key:
            if nonce_a in self._own_nonces:
                raise HandshakeError("that address is this node itself")
            self.duplicate_seen_at = hello.name
            log.error(
                "another live node presents this node's ID %s: was the data dir copied? "
                "Delete node.key on one of them to give it an identity of its own.",
                self.identity.short_id,
            )
            raise HandshakeError("you present this node's own ID: a copied data dir?")
        self._check_not_unpaired(hello.node_id)
        share = handshake.key_share(secret, pk_a, nonce_a) if mode == "secret" and secret else None
        opened = handshake.Opened.of(hello, share)
        nonce_b = self._nonces.issue(time.monotonic(), opened)
        pk_b = self.identity.public_key
        t = handshake.transcript(mode, pk_a, pk_b, nonce_a, nonce_b, opened.shares)
        reply = handshake.HelloReply(
            v=handshake.VERSION,
            mode=mode,
            node_id=self.identity.node_id,
            name=self.name,
            public_key=self.identity.public_key,
            cert=self.cert.decode(),
            peer_port=self.peer_port,
            nonce=nonce_b,
            pake=share.public if share else None,
            signature=self.identity.sign(_RESPONDER + b"|" + t),
        )
        return reply.wire()

    def open_handshakes(self) -> int:
        """Hellos answered and not yet confirmed or expired (at most MAX_OPEN_HANDSHAKES)."""
        return len(self._nonces.issued)

    def confirm(self, doc: object, remote_ip: str) -> Met:
        """Take a confirm (decoded JSON, not yet checked) from `remote_ip`; HandshakeError
        to refuse it, BusyError while that address is out of tries (at the secret, or at
        adding pairing requests). In secret mode the answer carries our proof (`Met`)."""
        confirm = handshake.parse(handshake.Confirm, doc)
        source, now = source_of(remote_ip), time.monotonic()
        self._check_strikes_from(source, now)
        hello = self._nonces.take(now, confirm.nonce)
        if (self.mode == "secret") != (hello.shares is not None):
            raise HandshakeError("the cluster mode changed during the handshake; try again")
        pk_a, pk_b = hello.public_key, self.identity.public_key
        t = handshake.transcript(self.mode, pk_a, pk_b, hello.nonce, confirm.nonce, hello.shares)
        handshake.check_signature(pk_a, _INITIATOR, t, confirm.signature)
        proof = None
        if hello.our_share is not None and hello.their_share is not None:
            key = handshake.session_key(
                hello.our_share, hello.their_share, hello.nonce, initiator=False
            )
            try:
                handshake.check_key_proof(key, _INITIATOR, t, confirm.proof or b"")
            except HandshakeError:
                self.strikes.failed(source, now)  # one wrong guess at the secret
                raise
            self.strikes.cleared(source)
            proof = handshake.key_proof(key, _RESPONDER, t)
        host = f"[{remote_ip}]" if ":" in remote_ip else remote_ip
        try:
            met = self._met(hello, f"http://{host}:{hello.api_port}", self.mode)
        except PendingFull as exc:
            raise BusyError(str(exc), retry_after=exc.retry_after) from None
        return Met(met.node, met.previous, met.dropped, proof)

    # -- both sides ---------------------------------------------------------------------

    def _met(self, other: handshake.Opened, api_url: str, mode: ClusterMode) -> Met:
        """Record a node that passed the handshake (`other`: what it said, validated)."""
        node_id = node_id_of(other.public_key)
        self._check_not_unpaired(node_id)
        was = self.store.state(node_id)
        meeting = self.store.met(
            node_id,
            other.public_key,
            paired=mode in ("open", "secret"),
            name=other.name,
            address=api_url,
            code=handshake.confirmation_code(self.identity.public_key, other.public_key),
            cert=other.cert,
            peer_port=other.peer_port,
        )
        node = meeting.node
        for gone in meeting.dropped:
            replaced = address_of(gone.address)[0] == address_of(api_url)[0]
            log.log(
                logging.INFO if replaced else logging.WARNING,
                "dropped the pairing request of %s (%s) from %s: %s",
                gone.name,
                gone.short_id,
                gone.address,
                "a newer one came from the same address" if replaced else "the list is full",
            )
        if node.state is TrustState.PAIRED and was is not TrustState.PAIRED:
            self.server_context.load_verify_locations(cadata=node.cert)
        return Met(node, was, meeting.dropped)

    def _check_not_unpaired(self, node_id: str) -> None:
        if self.store.state(node_id) is TrustState.UNPAIRED:
            raise HandshakeError("this node was unpaired; it must be paired again")


async def _say_hello(
    session: aiohttp.ClientSession, api_url: str, hello: handshake.Hello
) -> handshake.HelloReply:
    """Send our hello; the reply, checked. An older node is named as such."""
    try:
        document = await _post(session, api_url + HELLO_PATH, hello.wire())
    except HandshakeError as exc:
        if handshake.older_protocol(str(exc)):
            raise HandshakeError(
                "the other node speaks an older handshake protocol (1); this node speaks "
                f"{handshake.VERSION}: run the same Shoal version on both nodes"
            ) from None
        raise
    handshake.check_version(document, "the other node answers")
    return handshake.parse(handshake.HelloReply, document)


async def _post(session: aiohttp.ClientSession, url: str, doc: dict[str, object]) -> object:
    """POST a handshake message; the reply as decoded JSON, still to be parsed."""
    async with session.post(
        url, data=orjson.dumps(doc), headers={"Content-Type": "application/json"}
    ) as r:
        body = b""
        while len(body) <= REPLY_MAX_BYTES and (chunk := await r.content.read(1 << 14)):
            body += chunk
        if len(body) > REPLY_MAX_BYTES:
            raise HandshakeError("handshake reply too large")
        if r.status != 200:
            reason = (error_message(body) or f"HTTP {r.status}")[:300]
            # The other node wrote the reason, and it goes to our log: escaped if need be.
            raise HandshakeError(
                f"refused by the other node: {reason if reason.isprintable() else repr(reason)}"
            )
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise HandshakeError("handshake reply is not JSON") from None
