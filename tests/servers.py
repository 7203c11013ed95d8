"""A live optiq server for the tests, in this process, and raw HTTP helpers."""

import asyncio
import json
import socket
import threading

import openai

from optiq.commands.serve import ServeOptions, build_app
from optiq.http.server import serve


class Running:
    """The server on a free port in a thread of its own, with an openai client."""

    def __init__(self, app):
        self.app, self.ready = app, threading.Event()

        def on_ready(server):
            self.port = server.sockets[0].getsockname()[1]
            self.ready.set()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.task = self.loop.create_task(serve(app, "127.0.0.1", 0, on_ready))
            try:
                self.loop.run_until_complete(self.task)
            except asyncio.CancelledError:
                pass
            finally:  # close the connections still open (the clients' keep-alive)
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stop(self):
        self.client.close()
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        self.app.engine.close()


def start(**options):
    return Running(build_app(ServeOptions(port=0, dtype="float32", **options)))


def raw(port, data: bytes, read_timeout=10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def post(port, path, body, close=True) -> tuple:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    reply = raw(port, (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + data)
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]
