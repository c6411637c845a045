"""A real HTTP receiver on 127.0.0.1 for webhook tests: records every request and answers as scripted."""
from __future__ import annotations

import hashlib
import hmac
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    completed: bool = False  # the whole answer was written (False: the sender hung up first)


class Receiver:
    """`answers` are consumed one per request (the last one repeats): an int status, ("redirect", URL),
    ("slow", seconds), ("endless", status) for an answer body that never ends, or ("trickle", seconds):
    the status line, then one byte of a header every `seconds` until `release()`, then a 200."""

    def __init__(self, answers=(200,)):
        self.answers = list(answers)
        self.received: list[Received] = []
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Received(self.path, dict(self.headers), body, time.monotonic())
                receiver.received.append(request)
                answer = receiver.answers.pop(0) if len(receiver.answers) > 1 else receiver.answers[0]
                try:
                    receiver.answer(self, answer)
                    request.completed = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender stopped reading, as it should

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release(self) -> None:
        """Trickling answers finish now (and later requests are answered 200 at once)."""
        self.released.set()

    def answer(self, handler: BaseHTTPRequestHandler, answer) -> None:
        if isinstance(answer, int):
            handler.send_response(answer)
            handler.send_header("Content-Length", "2")
            handler.end_headers()
            handler.wfile.write(b"ok")
        elif answer[0] == "redirect":
            handler.send_response(302)
            handler.send_header("Location", answer[1])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif answer[0] == "slow":
            time.sleep(answer[1])
            self.answer(handler, 200)
        elif answer[0] == "held":  # answers 200 once the test calls release()
            self.released.wait(answer[1])
            raise_if_hung_up(handler)
            self.answer(handler, 200)
        elif answer[0] == "endless":
            handler.send_response(answer[1])
            handler.end_headers()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                handler.wfile.write(b"x" * 65536)
        elif answer[0] == "trickle":  # every byte resets a per-read time-out: only a total deadline ends it
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
            while not self.released.wait(answer[1]):
                handler.wfile.write(b"x")
            raise_if_hung_up(handler)
            handler.wfile.write(b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


def raise_if_hung_up(handler: BaseHTTPRequestHandler) -> None:
    """A sender that cut its attempt has closed the connection, but the first write after that still
    succeeds (only the second fails): without this check an answer finished right after a cut would
    count as completed although nobody read it."""
    try:  # no select(): a long test session's descriptors pass its limit of 1024
        closed = handler.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return  # nothing to read: the sender is still there
    except OSError:
        closed = True
    if closed:
        raise ConnectionResetError("the sender hung up")


def verify(secret: str, request: Received, tolerance: float = 300) -> bool:
    """What a receiver does with Erq-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">."""
    fields = dict(part.split("=", 1) for part in request.headers["Erq-Signature"].split(","))
    expected = hmac.new(secret.encode(), f"{fields['t']}.".encode() + request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) < tolerance
