"""Raw TCP loopback, the baseline the benchmarks compare the service's wire with.

A receiver process on 127.0.0.1 reads exactly N bytes with `recv_into` into a buffer
allocated once and answers one byte; the client `sendall`s the N bytes on a connection
opened once and waits for that byte. One direction only: on loopback both directions
take the same path. Shared by `service_throughput.py` and `worker_latency.py`; it needs
nothing but the standard library, so the receiver process (started with `spawn`)
imports nothing heavy.
"""

from __future__ import annotations

import multiprocessing
import socket
import struct
import time

LENGTH = struct.Struct("!Q")  # the raw TCP receiver's framing: a byte count, then bytes
CONNECT_TIMEOUT_S = 30.0


def recv_exactly(conn: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `conn`; False if the peer closed first."""
    while len(view):
        received = conn.recv_into(view)
        if received == 0:
            return False
        view = view[received:]
    return True


def tcp_receiver(listener: socket.socket) -> None:
    """The raw TCP baseline's receiver (its own process): per transfer, a byte count,
    then that many bytes read into a buffer allocated once; one byte answers each. A
    count of 0 ends it."""
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    header = bytearray(LENGTH.size)
    buffer = bytearray()
    with conn:
        while recv_exactly(conn, memoryview(header)):
            (count,) = LENGTH.unpack(header)
            if count == 0:
                return
            if len(buffer) < count:
                buffer = bytearray(count)
            if not recv_exactly(conn, memoryview(buffer)[:count]):
                return
            conn.sendall(b"\x01")


class TcpBaseline:
    """A receiver process and a connection to it."""

    def __init__(self) -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        # spawn, not fork: this process holds gRPC state by the time it matters, and
        # the receiver needs nothing of it.
        context = multiprocessing.get_context("spawn")
        self.process = context.Process(target=tcp_receiver, args=(listener,), daemon=True)
        self.process.start()
        self.sock = socket.create_connection(listener.getsockname(), timeout=CONNECT_TIMEOUT_S)
        listener.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack = bytearray(1)

    def transfer(self, payload: bytes | memoryview) -> None:
        self.sock.sendall(LENGTH.pack(len(payload)))
        self.sock.sendall(payload)
        if not recv_exactly(self.sock, memoryview(self.ack)):
            raise RuntimeError("the TCP receiver closed the connection")

    def seconds_per_transfer(self, nbytes: int, repeats: int, min_run_s: float) -> list[float]:
        """Seconds of one transfer of `nbytes` (zero bytes: TCP does not look at them):
        one warm-up transfer, then `repeats` runs, each repeating the transfer back to
        back until `min_run_s` has passed and counting the mean."""
        payload = bytes(nbytes)
        self.transfer(payload)
        runs = []
        for _ in range(repeats):
            count, elapsed = 0, 0.0
            while count == 0 or elapsed < min_run_s:
                start = time.perf_counter()
                self.transfer(payload)
                elapsed += time.perf_counter() - start
                count += 1
            runs.append(elapsed / count)
        return runs

    def close(self) -> None:
        try:
            self.sock.sendall(LENGTH.pack(0))
            self.sock.close()
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
