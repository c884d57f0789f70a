"""Serving a run over HTTP: the page beside this file (serve.html) and a JSON API for programs.

    python evaluate.py --run runs/20261127-101500 --serve    # then open http://127.0.0.1:8000/

evaluate.py loads the run and calls `serve` with its one classifying function
(evaluate.predict_proba), so this module holds the HTTP side only: the serving flags, the request
handling on the standard library's threaded server (each request's framing checked, a deadline
for a request to arrive whole, JSON errors for every fault), the checks that keep other web pages
and other machines out (Host, Origin, the JSON content type, a token), and a clean stop on Ctrl-C.
docs/serving.md describes the API and what the server guarantees.
"""

import argparse
import hmac
import html
import http.server
import ipaddress
import json
import os
import re
import selectors
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import decisions

MAX_TEXTS = 64  # texts in one request
MAX_BODY = 1 << 20  # 1 MiB: a request's body
REQUEST_TIMEOUT = 30.0  # seconds from a request's first byte to its last (headers and body)
LINGER = 2.0  # seconds a refused client's remaining bytes are read and dropped before closing
IDLE_TIMEOUT = 60  # seconds a keep-alive connection may wait for its next request
PAGE = Path(__file__).resolve().with_name("serve.html")
TOKEN_ENV = "GPT2_CLASSIFY_TOKEN"
ROUTES = {"/": "GET", "/health": "GET", "/classify": "POST"}
LOOPBACK_NAMES = ("localhost",)


# ----------------------------------------------------------------------------- flags

def _port(value):
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port; give 0 to 65535 (0 picks a "
                                         "free one)")
    return int(value)


def add_arguments(parser):
    """The serving flags, on evaluate.py's parser."""
    g = parser.add_argument_group("serving (--serve)")
    g.add_argument("--serve", action="store_true",
                   help="serve the run: a web page at / and a JSON API at /classify, until Ctrl-C")
    g.add_argument("--host", default="127.0.0.1",
                   help="the address --serve listens on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 for every network the machine is on, which needs --token)")
    g.add_argument("--port", type=_port, default=8000,
                   help="the port --serve listens on (default: 8000; 0 picks a free one)")
    g.add_argument("--token", help="a secret that every request but the page must carry as "
                   f"'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV}; required when --host "
                   "is not a loopback address)")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="a host name the server may be reached by, besides localhost and IP "
                   "addresses (repeatable); other Host headers are refused (DNS rebinding)")
    g.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a web origin (scheme://host[:port]) whose pages may call the API "
                   "(repeatable; default: none but the server's own page)")
    g.add_argument("--request-timeout", type=float, default=REQUEST_TIMEOUT, metavar="SECONDS",
                   help=f"how long a client has to send a whole request (default: "
                   f"{REQUEST_TIMEOUT:g}); slower ones get a 408")


@dataclass(frozen=True)
class Settings:
    """How to serve: where, and who may ask."""
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    allow_hosts: tuple = ()
    allow_origins: tuple = ()
    request_timeout: float = REQUEST_TIMEOUT
    log: bool = True


def is_loopback(host):
    """Whether `host` (a --host value) is an address of this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def settings(args, environ=os.environ):
    """Settings from evaluate.py's parsed flags; ValueError (one line) where they cannot serve."""
    token = args.token if args.token is not None else environ.get(TOKEN_ENV)
    where = "--token" if args.token is not None else TOKEN_ENV
    if token is not None and not token.strip():
        raise ValueError(f"{where} is empty; give a secret that is hard to guess, e.g. from "
                         "python -c 'import secrets; print(secrets.token_urlsafe())'")
    if token is None and not is_loopback(args.host):
        raise ValueError(f"--host {args.host} listens beyond this machine, and then every "
                         f"request must carry a token: pass --token SECRET (or set {TOKEN_ENV}), "
                         "or serve on --host 127.0.0.1")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout {args.request_timeout:g} must be more than 0 "
                         "seconds")
    for origin in args.allow_origin:
        if not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"--allow-origin {origin!r} is not an origin; give "
                             "scheme://host[:port], e.g. http://localhost:3000 (no path)")
    return Settings(host=args.host, port=args.port, token=token,
                    allow_hosts=tuple(h.lower() for h in args.allow_host),
                    allow_origins=tuple(args.allow_origin), request_timeout=args.request_timeout)


# ----------------------------------------------------------------------------- classifying

def class_probabilities(texts, classifier, tokenizer, info, device, predict, lock=None):
    """(predict's {class: probability} per text, truncated flags): a text is `truncated` when it
    has more tokens than the run's max_length, so that only its beginning was classified, as in
    training. `predict` is evaluate.predict_proba; `lock`, if given, is held around the model's
    work. A text the tokenizer refuses raises ValueError naming it as texts[i]."""
    max_length = min(info["max_length"], classifier.gpt.cfg.context_length)
    truncated = []
    for i, text in enumerate(texts):
        try:
            truncated.append(len(data.encode(text, tokenizer, pad=False)) > max_length)
        except ValueError as e:  # (every str encodes, "<|endoftext|>" as plain text: a guard)
            raise ValueError(f"texts[{i}] cannot be tokenized: {str(e).splitlines()[0]}") from e
    with lock or nullcontext(), torch.inference_mode():
        probs = predict(texts, classifier, info, device, tokenizer, batch_size=32)
    return probs, truncated


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}; the server goes on.
    `close`: the connection is out of step (or the client untrusted) and is closed after."""

    def __init__(self, status, message, headers=(), close=False):
        super().__init__(message)
        self.status, self.headers, self.close = status, dict(headers), close


def parse_texts(body):
    """The texts of a /classify body, or a RequestError that says what to send instead."""
    usage = 'send {"texts": ["a message", ...]}'
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestError(400, f"the body is not UTF-8 text; {usage}") from None
    except RecursionError:  # JSON nested thousands deep
        raise RequestError(400, f"the body is nested too deeply; {usage}") from None
    except ValueError as e:
        raise RequestError(400, f"the body is not valid JSON ({e}); {usage}") from None
    if not isinstance(request, dict) or "texts" not in request:
        raise RequestError(400, f'the body has no "texts"; {usage}')
    texts = request["texts"]
    if not isinstance(texts, list):
        raise RequestError(400, f'"texts" must be a list of strings; {usage}')
    if not texts:
        raise RequestError(400, f'"texts" is empty; {usage}')
    if len(texts) > MAX_TEXTS:
        raise RequestError(400, f'{len(texts)} texts is more than the {MAX_TEXTS} one request '
                           "may hold; split them over several requests")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(400, f"texts[{i}] is not a string; {usage}")
        if not text.strip():
            raise RequestError(400, f"texts[{i}] is empty; give a message to classify")
    return texts


# ----------------------------------------------------------------------------- the connection

class RequestReader:
    """A connection's input, read with a deadline per request: the clock starts at a request's
    first byte, and a request (line, headers and body) not whole by `limit` seconds later raises
    TimeoutError, however slowly its bytes trickle in. Between requests the connection may idle
    for `idle` seconds, or until the server stops (its `stop` socket becomes readable)."""

    def __init__(self, sock, stop):
        self.sock, self.stop, self.buf, self.deadline = sock, stop, bytearray(), None

    def wait_for_request(self, idle, limit):
        """True once a request has begun to arrive (its deadline starts); False when the
        connection stayed idle, was closed, or the server is stopping."""
        if not self.buf:
            with selectors.DefaultSelector() as selector:
                selector.register(self.sock, selectors.EVENT_READ)
                selector.register(self.stop, selectors.EVENT_READ)
                ready = {key.fileobj for key, _ in selector.select(idle)}
            if self.sock not in ready:  # bytes already sent win over a stop
                return False
        self.deadline = time.monotonic() + limit
        return True

    def _fill(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        self.sock.settimeout(left)
        chunk = self.sock.recv(1 << 16)
        self.buf += chunk
        return bool(chunk)

    def readline(self, limit=-1):
        while True:
            end = self.buf.find(b"\n")
            if end >= 0 and (limit < 0 or end < limit):
                n = end + 1
                break
            if 0 <= limit <= len(self.buf) or not self._fill():
                n = len(self.buf) if limit < 0 else min(limit, len(self.buf))
                break
        line = bytes(self.buf[:n])
        del self.buf[:n]
        return line

    def read(self, n):
        """Up to `n` bytes: fewer only where the client closed its side first."""
        while len(self.buf) < n and self._fill():
            pass
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self):
        pass  # the socket is the server's to close


# ----------------------------------------------------------------------------- the handler

class ServeHandler(http.server.BaseHTTPRequestHandler):
    """GET / (the page), GET /health, POST /classify; everything else a JSON 4xx."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection
    server_version = "gpt2-classify"
    timeout = IDLE_TIMEOUT  # also bounds writing an answer to a client that does not read it

    def setup(self):
        super().setup()
        self.rfile.close()
        self.rfile = RequestReader(self.connection, self.server.stop_signal)

    def finish(self):
        """After refusing a request whose bytes may still be coming, close gently: stop
        writing, then read and drop what arrives for a moment, so that the client reads the
        answer instead of a reset connection (a "lingering close")."""
        if getattr(self, "linger", False):
            try:
                self.connection.shutdown(socket.SHUT_WR)
                end = time.monotonic() + LINGER
                while (left := end - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    if not self.connection.recv(1 << 16):
                        break
            except OSError:
                pass
        super().finish()

    def handle_one_request(self):
        """One request, as http.server's, but within its deadline and with every answer JSON."""
        if not self.rfile.wait_for_request(self.timeout, self.server.settings.request_timeout):
            self.close_connection = True  # idle too long, closed, or the server stops
            return
        self.requestline, self.command, self.request_version = "", "", "HTTP/1.1"
        self.answered, self.extra_headers, self.linger = False, {}, False
        try:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:
                self.close_connection = True
                return
            if len(self.raw_requestline) > 65536:
                self.send_error(414, "the request line is over 64 KiB")
                return
            if not self.parse_request():  # it answered already (send_error)
                return
            answer = getattr(self, "do_" + self.command, None)
            if answer is None:
                self.send_error(501, f"{self.command} is not a method this server takes; use "
                                "GET /, GET /health or POST /classify")
                return
            answer()
        except TimeoutError:
            self.close_connection = self.linger = True
            if not self.answered:
                self._send_json(408, {"error": "the request did not arrive whole within "
                                      f"{self.server.settings.request_timeout:g} s; send it "
                                      "at once"})

    def do_GET(self):  # noqa: N802 (the names http.server calls)
        self._route()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET  # noqa: N815

    def _route(self):
        method, srv = self.command, self.server
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        try:
            body = self._read_body(method, path)
            self._check_host()
            if path not in ROUTES:
                raise RequestError(404, f"there is no {path}; try GET /, GET /health or "
                                   "POST /classify")
            allowed = ROUTES[path]
            if (method, path) == ("POST", "/classify") and \
                    self.headers.get_content_type() != "application/json":
                # What a page on another site can send without asking first (a form, text/plain).
                raise RequestError(415, "send the body as Content-Type: application/json, not "
                                   f"{self.headers.get('Content-Type', 'none')}")
            origin = self._check_origin()
            if method == "OPTIONS" and origin and \
                    self.headers.get("Access-Control-Request-Method"):
                return self._preflight(allowed)
            if path != "/":
                self._check_token()
            if method != allowed:
                raise RequestError(405, f"{path} takes {allowed}, not {method}",
                                   {"Allow": allowed})
            if path == "/":
                self._send(200, srv.page, "text/html; charset=utf-8")
            elif path == "/health":
                self._send_json(200, {"status": "ok", **srv.about})
            else:
                self._classify(body)
        except RequestError as e:
            self.close_connection = self.close_connection or e.close
            self.linger = self.linger or e.close
            self._send_json(e.status, {"error": str(e)}, e.headers)
        except TimeoutError:
            raise  # handle_one_request answers it: the connection is out of step
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self.close_connection = True
        except Exception as e:  # a bug, not the client's fault: say so and keep serving
            self._send_json(500, {"error": f"the server failed on this request ({e!r})"})

    # --- framing: the body as its one Content-Length says, and nothing else

    def _read_body(self, method, path):
        if self.headers.get_all("Transfer-Encoding"):
            raise RequestError(411, "send the body with a Content-Length, not chunked",
                               close=True)
        lengths = self.headers.get_all("Content-Length") or []
        if len(lengths) > 1:
            raise RequestError(400, f"{len(lengths)} Content-Length headers; send one",
                               close=True)
        if not lengths:
            if (method, path) == ("POST", "/classify"):
                raise RequestError(411, 'send a body with a Content-Length: {"texts": [...]}',
                                   close=True)
            return b""
        value = lengths[0].strip()
        if not re.fullmatch(r"[0-9]+", value):
            raise RequestError(400, f"Content-Length {value!r} is not a byte count", close=True)
        length = int(value)
        if length > MAX_BODY:  # answered at once; the lingering close drops what was sent
            raise RequestError(413, f"the body is over {MAX_BODY} bytes; send fewer or shorter "
                               "texts per request", close=True)
        body = self.rfile.read(length)
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of its Content-Length "
                               f"{length} bytes; send the whole body", close=True)
        return body

    # --- who may ask

    def _check_host(self):
        """The Host must be a name this server is reached by: a page on another name that
        resolves here (DNS rebinding) is refused. IP addresses cannot be rebound."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1:
            raise RequestError(400, "send one Host header", close=True)
        host = hosts[0].strip().lower()
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
        try:
            ipaddress.ip_address(name)
            return
        except ValueError:
            pass
        if name in LOOPBACK_NAMES or name in self.server.settings.allow_hosts:
            return
        raise RequestError(403, f"Host {hosts[0]!r} is not a name this server is reached by; "
                           "use its address, localhost, or start it with --allow-host "
                           f"{name}", close=True)

    def _check_origin(self):
        """A request a web page sends names the page's origin: the server's own page, or one
        --allow-origin names (whose answers then carry its CORS permission). Others: 403."""
        origin = self.headers.get("Origin")
        if origin is None:
            return None  # not from a browser page (curl, a program)
        if origin in self.server.settings.allow_origins:
            self.extra_headers.update({"Access-Control-Allow-Origin": origin, "Vary": "Origin"})
            return origin
        if origin.lower() == "http://" + self.headers["Host"].strip().lower():
            return None  # the server's own page
        raise RequestError(403, f"pages at {origin} may not use this server; start it with "
                           f"--allow-origin {origin} to let them")

    def _preflight(self, allowed):
        """A browser asking whether an allowed origin's page may send this request."""
        self._send(204, b"", None, {
            "Access-Control-Allow-Methods": allowed,
            "Access-Control-Allow-Headers": "Content-Type, Authorization",
            "Access-Control-Max-Age": "600"})

    def _check_token(self):
        token = self.server.settings.token
        if token is None:
            return
        scheme, _, given = (self.headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):
            raise RequestError(401, "this server needs its token: send 'Authorization: Bearer "
                               "TOKEN' (the --token it was started with)",
                               {"WWW-Authenticate": "Bearer"})

    # --- the answer

    def _classify(self, body):
        texts = parse_texts(body)
        srv = self.server
        try:
            probs, truncated = class_probabilities(texts, srv.classifier, srv.tokenizer,
                                                   srv.info, srv.device, srv.predict,
                                                   lock=srv.model_lock)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        info = srv.info
        decision = info.get("decision")
        cal = info.get("calibration")
        self._send_json(200, {"predictions": [
            {"label": decisions.decide(p, info["class_names"], decision), "probabilities": p,
             "truncated": cut} for p, cut in zip(probs, truncated)],
            # how the probabilities and labels were made (docs/decisions.md)
            "calibrated": {"temperature": cal["temperature"]} if cal else False,
            **({"decision": {k: decision[k] for k in ("positive_class", "threshold", "target")}}
               if decision else {})})

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (a malformed request line or header), as JSON."""
        self.close_connection = self.linger = True
        self._send_json(code, {"error": message or self.responses.get(code, ("",))[0]})

    def _send_json(self, status, obj, headers=()):
        self._send(status, json.dumps(obj).encode() + b"\n", "application/json", headers,
                   note=obj.get("error"))

    def _send(self, status, body, content_type, headers=(), note=None):
        if self.server.stopping:
            self.close_connection = True
        self.answered = True
        if self.request_version == "HTTP/0.9":  # (http.server's default while it parses)
            self.request_version, self.close_connection = "HTTP/1.0", True  # a status line too
        self.connection.settimeout(self.timeout)
        self.log_message('"%s" %s %s', self.requestline, status, note or len(body))
        self.send_response_only(status)
        self.send_header("Server", self.version_string())
        self.send_header("Date", self.date_time_string())
        if status != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for name, value in {**self.extra_headers, **dict(headers)}.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):
        if self.server.settings.log:
            super().log_message(format, *args)


# ----------------------------------------------------------------------------- the server

class Server(http.server.ThreadingHTTPServer):
    """A thread per connection. Closing it (server_close) stops idle connections at once, lets
    the requests in flight finish, and waits for them: a thread killed inside torch at exit
    aborts the process ("terminate called without an active exception")."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address, settings):
        self.settings, self.stopping = settings, False
        self.stop_signal, self._stop_sender = socket.socketpair()
        try:
            super().__init__(address, ServeHandler)
        except OSError:
            self.stop_signal.close()
            self._stop_sender.close()
            raise

    def server_close(self):
        if not self.stopping:
            self.stopping = True
            self._stop_sender.send(b"x")  # wakes every idle connection's wait (never read)
        super().server_close()  # stop listening, then join the connections' threads
        self.stop_signal.close()
        self._stop_sender.close()

    def handle_error(self, request, client_address):
        """A connection that failed outside a request (e.g. reset by the client): one line."""
        error = sys.exc_info()[1]
        if self.settings.log and not isinstance(error, ConnectionError):
            print(f"{client_address[0]} - connection failed: {error!r}", file=sys.stderr)


def make_server(classifier, info, device, run_name, host="127.0.0.1", port=8000, log=True, *,
                predict, settings=None):
    """A Server for one run (not started: call its serve_forever). `predict` is
    evaluate.predict_proba; `settings` (Settings) overrides host, port and log."""
    settings = settings or Settings(host=host, port=port, log=log)
    server = Server((settings.host, settings.port), settings)
    server.classifier, server.info, server.device = classifier, info, device
    server.predict, server.tokenizer, server.model_lock = predict, data.get_tokenizer(), \
        threading.Lock()
    server.about = {"run": run_name, "classes": list(info["class_names"]),
                    "device": str(device), "max_length": info["max_length"],
                    "max_texts": MAX_TEXTS, "max_body_bytes": MAX_BODY}
    fill = {"run": run_name, "classes": ", ".join(info["class_names"]), "device": str(device),
            "max_length": str(info["max_length"]),
            "token": "required" if settings.token else "none"}
    page = PAGE.read_text(encoding="utf-8")
    for key, value in fill.items():
        page = page.replace("{{" + key + "}}", html.escape(value))
    server.page = page.encode()
    return server


def serve(run_dir, classifier, info, device, predict, settings=Settings()):
    """Serve until Ctrl-C, then finish the requests in flight, close and return."""
    try:
        server = make_server(classifier, info, device, Path(run_dir).resolve().name,
                             predict=predict, settings=settings)
    except OSError as e:
        raise ValueError(f"cannot listen on {settings.host}:{settings.port} "
                         f"({e.strerror or e}); pass another --port (0 picks a free one) or "
                         "--host") from e
    shown = f"[{server.server_address[0]}]" if ":" in server.server_address[0] else \
        server.server_address[0]
    print(f"Serving {run_dir} (classes: {', '.join(info['class_names'])}; device: {device}) "
          f"at http://{shown}:{server.server_address[1]}/  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    print("Stopping: finishing the requests in flight (Ctrl-C again stops at once)", flush=True)
    try:
        server.server_close()
    except KeyboardInterrupt:
        print("Stopped without finishing the requests in flight.", flush=True)
        os._exit(130)  # skips the interpreter's exit, which would wait for them again
    print("Stopped.", flush=True)
