"""A real S3 protocol server on 127.0.0.1 (moto's, the one the tests use) behind a middleware that counts every
request by kind and bytes, and can misbehave on purpose as real servers do: ignore ``If-None-Match`` (S3-compatible
stores that do not implement conditional writes), answer a conditional PUT with 409 ``ConditionalRequestConflict``
(S3's answer to two racing conditional writes), or go away.

Used by the storage tests and by ``python -m bench s3``.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from moto.moto_server.threaded_moto_server import MotoRequestHandler
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server


class _Quiet(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # no line per request on stderr
        pass


CONFLICT = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
            b"<Message>A conflicting conditional operation is currently in progress against this resource."
            b"</Message></Error>")


@dataclass
class Request:
    method: str
    kind: str
    """LIST, HEAD, GET (a whole object), RANGE (a byte range), PUT, DELETE, or OTHER."""
    key: str
    bytes_out: int
    status: int


@dataclass
class Behaviour:
    ignore_if_none_match: bool = False
    conflict_keys: set[str] = field(default_factory=set)
    """Keys whose next conditional PUT gets a 409 (each once)."""


class Counting:
    """The WSGI middleware: counts, and misbehaves as :class:`Behaviour` says."""

    def __init__(self, app: Any) -> None:
        self.app, self.behaviour, self.log, self.lock = app, Behaviour(), [], threading.Lock()

    def __call__(self, environ: dict, start_response: Any) -> Any:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        key = path.lstrip("/").partition("/")[2]
        query = parse_qs(environ.get("QUERY_STRING", ""))
        conditional = "HTTP_IF_NONE_MATCH" in environ
        if self.behaviour.ignore_if_none_match:
            environ.pop("HTTP_IF_NONE_MATCH", None)
        elif method == "PUT" and conditional and key in self.behaviour.conflict_keys:
            self.behaviour.conflict_keys.discard(key)
            start_response("409 Conflict", [("Content-Type", "application/xml"),
                                             ("Content-Length", str(len(CONFLICT)))])
            self._note(Request(method, "PUT", key, len(CONFLICT), 409))
            return [CONFLICT]
        listing = method == "GET" and ("list-type" in query or "prefix" in query or not key)
        key = query.get("prefix", [key])[0] if listing else key
        kind = ("LIST" if listing else
                "RANGE" if method == "GET" and "HTTP_RANGE" in environ else
                method if method in ("GET", "HEAD", "PUT", "DELETE") else "OTHER")
        status: list[int] = [0]

        def start(code: str, headers: Any, *a: Any) -> Any:
            status[0] = int(code.split()[0])
            return start_response(code, headers, *a)

        body = list(self.app(environ, start))
        self._note(Request(method, kind, key, sum(len(b) for b in body), status[0]))
        return body

    def _note(self, r: Request) -> None:
        with self.lock:
            self.log.append(r)

    def take(self) -> list[Request]:
        """The requests since the last call."""
        with self.lock:
            out, self.log = self.log, []
        return out


class S3Server:
    """moto's S3 server on a free loopback port, counting; ``with S3Server() as s3: s3.options`` for the config."""

    def __init__(self) -> None:
        self.counting = Counting(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.counting, True, request_handler=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        host, port = self._server.server_address[:2]
        self.endpoint = f"http://{host}:{port}"
        self.options = {"s3": {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}}

    @property
    def behaviour(self) -> Behaviour:
        return self.counting.behaviour

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        """The server goes away (its objects stay in this process's moto backend)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def restart(self, port: int) -> None:
        """The server comes back on ``port``, with the objects it held."""
        self._server = make_server("127.0.0.1", port, self.counting, True, request_handler=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tally(requests: list[Request], prefix: str = "") -> Counter:
    """Requests by kind under a key prefix (inside the bucket), and ``bytes`` read (GET and RANGE bodies)."""
    out: Counter = Counter()
    for r in requests:
        if r.key.startswith(prefix):
            out[r.kind] += 1
            if r.kind in ("GET", "RANGE"):
                out["bytes"] += r.bytes_out
    return out
