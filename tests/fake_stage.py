"""A stand-in stage for client-side tests: a ROUTER on a free 127.0.0.1 port, served by a thread,
answering each decoded message with what ``answer(msg)`` returns (a Message, or None for no
reply). ``handled`` counts the messages ``answer`` was given, by kind."""

from __future__ import annotations

import collections
import threading
from typing import Callable

import zmq

from splitnet.wire import Message, decode_message, encode_message


class FakeStage:
    def __init__(self, answer: Callable[[Message], Message | None], sock: zmq.Socket | None = None):
        self.answer = answer
        self.sock = sock if sock is not None else zmq.Context.instance().socket(zmq.ROUTER)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.handled: collections.Counter[str] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20):
                continue
            ident, *body = self.sock.recv_multipart()
            msg = decode_message(body)
            self.handled[msg.kind] += 1
            reply = self.answer(msg)
            if reply is not None:
                self.sock.send_multipart([ident, *encode_message(reply)])
        self.sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
