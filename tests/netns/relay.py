"""A userspace stand-in for `tc netem`, for kernels built without sch_netem.

Runs inside the bridge namespace of a `Lan` and forwards Ethernet frames between two
interfaces there: `--outer` (the switch-side end of a host's cable) and `--inner` (a veth
whose peer is a port of the bridge). Frames leaving the host (outer -> inner) get the
configured delay, jitter and loss, the same as netem on the host's eth0 egress; frames
towards the host pass untouched.

Frames are read and written with PACKET_VNET_HDR, so checksum-offload and GSO metadata
travel with them and the receiving stack finishes the checksums, as it would behind a
kernel bridge.

Protocol: prints `ready` once both sockets are bound. Then reads one JSON object a line
on stdin (`{"delay_ms": .., "jitter_ms": .., "loss_pct": ..}`), applies it and prints
`ok`. Exits when stdin closes, so it never outlives the `Lan` that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_OUTGOING = 4
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
BUFSIZE = 1 << 18  # a GSO frame (64 KiB) plus headers, with room to spare
BURST = 64  # frames read from one socket before looking at the others


def open_port(ifname: str) -> socket.socket:
    # Protocol 0 until bound: a packet socket made with ETH_P_ALL would also queue frames
    # from every other interface in the namespace until bind() narrows it to one.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    with contextlib.suppress(OSError):  # before Linux 4.20: filtered by packet type instead
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    sock.bind((ifname, ETH_P_ALL))  # CPython applies htons() itself
    sock.setblocking(False)
    return sock


def send(sock: socket.socket, frame: bytes) -> None:
    with contextlib.suppress(OSError):  # link down, queue full: lost, as on a wire
        sock.send(frame)


class Impairment:
    def __init__(self, delay_ms: float, jitter_ms: float, loss_pct: float) -> None:
        self.delay = delay_ms / 1000
        self.jitter = jitter_ms / 1000
        self.loss = loss_pct / 100

    def due(self, now: float) -> float | None:
        """When a frame received now leaves, or None when it is lost."""
        if self.loss and random.random() < self.loss:
            return None
        delay = self.delay
        if self.jitter:
            delay = max(0.0, delay + random.uniform(-self.jitter, self.jitter))
        return now + delay


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outer", required=True, help="interface towards the host")
    parser.add_argument("--inner", required=True, help="interface towards the bridge")
    parser.add_argument("--delay-ms", type=float, default=0)
    parser.add_argument("--jitter-ms", type=float, default=0)
    parser.add_argument("--loss-pct", type=float, default=0)
    args = parser.parse_args()

    outer, inner = open_port(args.outer), open_port(args.inner)
    impairment = Impairment(args.delay_ms, args.jitter_ms, args.loss_pct)
    queue: list[tuple[float, int, bytes]] = []  # (due, sequence, frame) outer -> inner
    sequence = 0
    stdin = sys.stdin.fileno()
    print("ready", flush=True)

    poller = select.poll()
    for fd in (outer.fileno(), inner.fileno(), stdin):
        poller.register(fd, select.POLLIN)
    while True:
        timeout_ms = None
        if queue:
            timeout_ms = max(0, int((queue[0][0] - time.monotonic()) * 1000) + 1)
        for fd, _ in poller.poll(timeout_ms):
            if fd == stdin:
                line = sys.stdin.readline()
                if not line:
                    return 0
                p = json.loads(line)
                impairment = Impairment(p["delay_ms"], p["jitter_ms"], p["loss_pct"])
                print("ok", flush=True)
                continue
            source = outer if fd == outer.fileno() else inner
            for _ in range(BURST):
                try:
                    frame, address = source.recvfrom(BUFSIZE)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING:
                    continue
                if source is inner:
                    send(outer, frame)
                    continue
                due = impairment.due(time.monotonic())
                if due is None:
                    continue
                if not queue and due <= time.monotonic():
                    send(inner, frame)
                else:
                    sequence += 1
                    heapq.heappush(queue, (due, sequence, frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            send(inner, heapq.heappop(queue)[2])


if __name__ == "__main__":
    sys.exit(main())
