"""serve.py under faults and from browsers' pages: each case of issue 20 with the status it gets,
the connection after it, a clean stop on Ctrl-C, and who may ask (Host, Origin, content type,
token). Everything runs on a tiny run made from data the tests write (test_serve's tiny_run), on
127.0.0.1, with every wait bounded.
"""

import argparse
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import data
import evaluate
import serve
import test_serve
from test_serve import HAM, SPAM, _read_line

tiny_run, loaded = test_serve.tiny_run, test_serve.loaded  # the served run: its fixtures

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a finetune.py run, a subprocess
GOOD = json.dumps({"texts": [HAM]}).encode()


@pytest.fixture
def start(loaded, tiny_run):
    """start(**Settings fields) -> a Server for the tiny run on 127.0.0.1 (a free port), serving
    in a thread; every one is closed at the end."""
    classifier, info, device = loaded
    started = []

    def start(**fields):
        settings = serve.Settings(**{"port": 0, "log": False, **fields})
        srv = serve.make_server(classifier, info, device, tiny_run.name, settings=settings,
                                predict=evaluate.predict_proba)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        srv.port = srv.server_address[1]
        started.append((srv, thread))
        return srv

    yield start
    for srv, thread in started:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def raw(port, method="POST", path="/classify", body=GOOD, headers=None, host=None):
    """The bytes of one request, as a client would write them: Host, JSON content type and the
    body's length unless `headers` says otherwise (a None value leaves a header out)."""
    head = {"Host": host or f"127.0.0.1:{port}", "Content-Type": "application/json",
            "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()
                                             if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response(sock, method="POST"):
    """(status, headers, JSON body or raw bytes) of the next response on `sock`."""
    r = http.client.HTTPResponse(sock, method=method)
    r.begin()
    body = r.read()
    if body and r.headers.get_content_type() == "application/json":
        body = json.loads(body)
    return r.status, r.headers, body


def connect(srv):
    return socket.create_connection(("127.0.0.1", srv.port), timeout=30)


def ask(srv, payload, method="POST"):
    with connect(srv) as s:
        s.sendall(payload)
        return response(s, method)


def assert_classified(status, body):
    assert status == 200, body
    assert body["predictions"][0]["label"] in ("not spam", "spam")


# ----------------------------------------------------------------------------- status per fault

def _fault_cases(port):
    big = serve.MAX_BODY + 1
    return [
        ("malformed JSON", raw(port, body=b'{"texts": ['), 400, "not valid JSON"),
        ("JSON nested 10,000 deep", raw(port, body=b'{"texts": ' + b"[" * 10000 + b"]" * 10000
                                        + b"}"), 400, "nested too deeply"),
        ("two Content-Lengths", raw(port, headers={"Content-Length": f"{len(GOOD)}\r\n"
                                                   f"Content-Length: {len(GOOD)}"}),
         400, "2 Content-Length headers"),
        ("chunked", raw(port, body=b"5\r\nhello\r\n0\r\n\r\n",
                        headers={"Content-Length": None, "Transfer-Encoding": "chunked"}),
         411, "not chunked"),
        ("no Content-Length", raw(port, body=b"", headers={"Content-Length": None}), 411,
         "Content-Length"),
        ("Content-Length not a number", raw(port, body=b"", headers={"Content-Length": "1e3"}),
         400, "not a byte count"),
        ("a body over the limit", raw(port, body=b"", headers={"Content-Length": str(big)}), 413,
         "over"),
        ("text/plain", raw(port, headers={"Content-Type": "text/plain"}), 415,
         "application/json"),
        ("a form", raw(port, headers={"Content-Type": "application/x-www-form-urlencoded"}), 415,
         "application/json"),
        ("no content type", raw(port, headers={"Content-Type": None}), 415, "application/json"),
        ("a foreign Host", raw(port, host=f"rebind.example:{port}"), 403, "--allow-host"),
        ("no Host", raw(port, headers={"Host": None}), 400, "Host"),
        ("a foreign Origin", raw(port, headers={"Origin": "http://evil.example"}), 403,
         "--allow-origin http://evil.example"),
        ("an unknown path", raw(port, path="/predict"), 404, "there is no /predict"),
        ("GET /classify", raw(port, "GET", body=b""), 405, "takes POST"),
        ("OPTIONS /classify", raw(port, "OPTIONS", body=b""), 405, "takes POST"),
        ("an unknown method", raw(port, "BREW", body=b""), 501, "not a method"),
        ("a bad HTTP version", raw(port, body=b"").replace(b"HTTP/1.1", b"HTTP/9.9", 1), 505,
         ""),
        ("a header line over 64 KiB", raw(port, headers={"X-Long": "x" * 70000}), 431, ""),
    ]


FAULTS = [case[0] for case in _fault_cases(0)]


@pytest.mark.parametrize("what", FAULTS)
def test_each_fault_gets_its_status_as_json_and_the_server_goes_on(start, what):
    srv = start()
    _, payload, status, message = next(c for c in _fault_cases(srv.port) if c[0] == what)
    got, head, body = ask(srv, payload)
    assert got == status, body
    assert head.get_content_type() == "application/json"
    assert message in body["error"]
    assert "Access-Control-Allow-Origin" not in head  # no CORS permission unless given
    assert_classified(*ask(srv, raw(srv.port))[::2])


def test_head_gets_the_json_405_without_a_body(start):
    srv = start()
    with connect(srv) as s:
        s.sendall(raw(srv.port, "HEAD", "/health", body=b""))
        status, head, body = response(s, "HEAD")
        assert status == 405 and head["Allow"] == "GET" and body == b""
        assert head.get_content_type() == "application/json" and int(head["Content-Length"]) > 0
        s.sendall(raw(srv.port))  # the connection is still in step
        assert_classified(*response(s)[::2])


# ----------------------------------------------------------------------------- keep-alive

def test_a_keep_alive_connection_is_usable_after_each_4xx(start):
    srv = start(token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    faults = [(raw(srv.port, body=b"{", headers=auth), 400),
              (raw(srv.port, body=b"[" * 10000, headers=auth), 400),
              (raw(srv.port, headers={"Content-Type": "text/plain", **auth}), 415),
              (raw(srv.port, headers={"Origin": "http://evil.example", **auth}), 403),
              (raw(srv.port), 401),
              (raw(srv.port, headers={"Authorization": "Bearer wrong"}), 401),
              (raw(srv.port, path="/nowhere", headers=auth), 404),
              (raw(srv.port, "GET", headers=auth), 405),
              (raw(srv.port, "OPTIONS", body=b"", headers=auth), 405)]
    with connect(srv) as s:
        for payload, status in faults:
            s.sendall(payload)
            got, head, body = response(s)
            assert got == status, body
            assert head.get("Connection") != "close"
            s.sendall(raw(srv.port, headers=auth))
            assert_classified(*response(s)[::2])


# ----------------------------------------------------------------------------- slow clients

def test_a_body_shorter_than_its_length_gets_a_408_and_one_log_line(start, capsys):
    srv = start(request_timeout=1, log=True)
    with connect(srv) as s:
        s.sendall(raw(srv.port, body=GOOD[:10], headers={"Content-Length": str(len(GOOD))}))
        status, head, body = response(s)  # the client waits: the deadline answers it
    assert status == 408 and head["Connection"] == "close"
    assert "did not arrive whole within 1 s" in body["error"]
    srv.shutdown()
    srv.server_close()
    log = capsys.readouterr().err.splitlines()
    assert len(log) == 1 and '"POST /classify HTTP/1.1" 408' in log[0], log


def test_a_body_cut_short_by_the_client_gets_a_400(start):
    srv = start()
    with connect(srv) as s:
        s.sendall(raw(srv.port, body=GOOD[:10], headers={"Content-Length": str(len(GOOD))}))
        s.shutdown(socket.SHUT_WR)
        status, _, body = response(s)
    assert status == 400 and f"ended after 10 of its Content-Length {len(GOOD)}" in body["error"]


def test_a_trickled_body_gets_a_408_before_it_ends(start):
    """One byte every 0.25 s of a 40-byte body (10 s) against a deadline of 1 s: the answer
    comes while the client is still sending."""
    srv = start(request_timeout=1)
    body = json.dumps({"texts": ["x" * 25]}).encode()
    assert len(body) == 40
    sent = 0
    with connect(srv) as s:
        s.sendall(raw(srv.port, body=body)[:-len(body)])  # the line and headers at once
        while sent < len(body) and not select.select([s], [], [], 0.25)[0]:
            s.sendall(body[sent:sent + 1])
            sent += 1
        status, _, answer = response(s)
    assert sent < len(body) and status == 408, (sent, status, answer)


def test_trickled_headers_get_a_408_too(start):
    srv = start(request_timeout=1)
    sent = 0
    payload = raw(srv.port)
    with connect(srv) as s:
        while sent < len(payload) and not select.select([s], [], [], 0.25)[0]:
            s.sendall(payload[sent:sent + 1])
            sent += 1
        status, _, answer = response(s)
    assert sent < len(payload) and status == 408, (sent, status, answer)


# ----------------------------------------------------------------------------- stopping

def test_closing_the_server_ends_idle_keep_alive_connections_at_once(start):
    """An idle keep-alive connection would hold its thread for IDLE_TIMEOUT (60 s); closing the
    server wakes it instead (bounded here at 20 s, far below 60)."""
    srv = start()
    with connect(srv) as s:
        s.sendall(raw(srv.port))
        assert_classified(*response(s)[::2])
        srv.shutdown()
        closer = threading.Thread(target=srv.server_close)
        closer.start()
        closer.join(timeout=20)
        assert not closer.is_alive(), "server_close waited on an idle connection"
        assert s.recv(1) == b""  # the server closed it


def test_ctrl_c_with_a_request_in_flight_finishes_it_and_exits_0(tiny_run):
    """Ctrl-C while a request is on its way: the request is answered (200), the process exits
    0 without "terminate called" (a daemon thread killed inside torch) or a traceback. The
    server needs a token here, from the environment."""
    env = {**os.environ, serve.TOKEN_ENV: "from-env"}
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "--serve", "--run",
                             str(tiny_run), "--port", "0"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, timeout=120)
        port = int(line.split(" at http://127.0.0.1:", 1)[1].split("/", 1)[0])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(raw(port))
            assert response(s)[0] == 401  # the token from GPT2_CLASSIFY_TOKEN is required
            auth = {"Authorization": "Bearer from-env"}
            s.sendall(raw(port, headers=auth))
            assert_classified(*response(s)[::2])
            payload = raw(port, headers=auth)
            s.sendall(payload[:-5])  # a request in flight: its body not yet whole
            proc.send_signal(signal.SIGINT)
            assert _read_line(proc, timeout=60).startswith("Stopp")
            s.sendall(payload[-5:])
            status, head, body = response(s)
            assert_classified(status, body)
            assert head["Connection"] == "close"
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "terminate called" not in err and "Traceback" not in err, err
    assert out.rstrip().endswith("Stopped."), out


# ----------------------------------------------------------------------------- who may ask

def test_a_cross_origin_simple_post_as_a_browser_sends_it_is_refused(start):
    """What any web page can make a browser send without a preflight: text/plain, its Origin,
    and (DNS rebinding) a Host of the attacker's name. None of it reaches the model."""
    srv = start()
    browser = {"Origin": "http://evil.example", "Content-Type": "text/plain;charset=UTF-8",
               "Sec-Fetch-Site": "cross-site"}
    status, head, body = ask(srv, raw(srv.port, headers=browser))
    assert status == 415 and "Access-Control-Allow-Origin" not in head
    status, _, body = ask(srv, raw(srv.port, host=f"evil.example:{srv.port}",
                                   headers={"Origin": f"http://evil.example:{srv.port}"}))
    assert status == 403 and "evil.example" in body["error"]


def test_the_servers_own_page_and_names_are_served(start):
    srv = start(allow_hosts=("classify.lan",))
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "localhost",
                 f"classify.lan:{srv.port}", f"CLASSIFY.LAN:{srv.port}", f"[::1]:{srv.port}"):
        origin = "http://" + host
        status, head, body = ask(srv, raw(srv.port, host=host, headers={"Origin": origin}))
        assert_classified(status, body)
        assert "Access-Control-Allow-Origin" not in head  # same origin needs none
    assert ask(srv, raw(srv.port, host="other.lan"))[0] == 403


def test_an_origin_that_only_starts_with_the_servers_address_is_refused(start):
    """The same origin is the whole origin: http://127.0.0.1:PORT.evil.example (a name an
    attacker owns) or the address on another port is another site."""
    srv = start()
    host = f"127.0.0.1:{srv.port}"
    for origin in (f"http://{host}.evil.example", f"http://{host}0", f"http://{host}@evil.example",
                   f"https://{host}"):
        status, head, body = ask(srv, raw(srv.port, host=host, headers={"Origin": origin}))
        assert status == 403 and origin in body["error"], (origin, status, body)
        assert "Access-Control-Allow-Origin" not in head


def test_json_with_a_charset_parameter_is_json(start):
    """Content-Type: application/json; charset=utf-8 (what many clients send) is JSON."""
    srv = start()
    for value in ("application/json; charset=utf-8", "Application/JSON;charset=UTF-8"):
        status, _, body = ask(srv, raw(srv.port, headers={"Content-Type": value}))
        assert_classified(status, body)


def test_an_allowed_origin_gets_its_preflight_and_cors_answers(start):
    srv = start(allow_origins=("http://app.example:3000",))
    origin = {"Origin": "http://app.example:3000"}
    status, head, body = ask(srv, raw(srv.port, "OPTIONS", body=b"", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type", "Content-Type": None}), "OPTIONS")
    assert status == 204 and body == b""
    assert head["Access-Control-Allow-Origin"] == "http://app.example:3000"
    assert head["Access-Control-Allow-Methods"] == "POST"
    assert "Content-Type" in head["Access-Control-Allow-Headers"]
    status, head, body = ask(srv, raw(srv.port, headers=origin))
    assert_classified(status, body)
    assert head["Access-Control-Allow-Origin"] == "http://app.example:3000"
    # ... and no other origin.
    status, head, _ = ask(srv, raw(srv.port, "OPTIONS", body=b"", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}), "OPTIONS")
    assert status == 403 and "Access-Control-Allow-Origin" not in head


def test_a_token_is_required_by_the_api_but_not_by_the_page(start):
    srv = start(token="s3cret")
    status, head, body = ask(srv, raw(srv.port))
    assert status == 401 and head["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in body["error"] and "s3cret" not in body["error"]
    assert ask(srv, raw(srv.port, "GET", "/health", b""), "GET")[0] == 401
    assert ask(srv, raw(srv.port, headers={"Authorization": "Bearer s3cre"}))[0] == 401
    for scheme in ("Basic", "Token", ""):  # the token under another scheme, or none
        assert ask(srv, raw(srv.port, headers={"Authorization": f"{scheme} s3cret"}))[0] == 401
    assert_classified(*ask(srv, raw(srv.port, headers={"Authorization": "bearer s3cret"}))[::2])
    status, _, page = ask(srv, raw(srv.port, "GET", "/", b""), "GET")
    page = page.decode()
    assert status == 200 and 'data-token="required"' in page and "s3cret" not in page
    assert 'headers["Authorization"] = "Bearer " + token.value' in page
    assert 'data-token="none"' in start().page.decode()  # no field where none is needed


def _args(*argv):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    return p.parse_args(argv)


def test_a_token_is_required_beyond_this_machine(tiny_run, capsys, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--serve", "--run", str(tiny_run), "--host", "0.0.0.0", "--port", "0"])
    message = str(e.value.code)
    assert message.startswith("error: --host 0.0.0.0 listens beyond this machine")
    assert "--token" in message and serve.TOKEN_ENV in message and "\n" not in message
    assert "Serving" not in capsys.readouterr().out  # it never listened
    with pytest.raises(ValueError, match="--token is empty"):
        serve.settings(_args("--host", "0.0.0.0", "--token", " "), environ={})
    assert serve.settings(_args("--host", "0.0.0.0"), environ={serve.TOKEN_ENV: "t"}).token == "t"
    assert serve.settings(_args("--host", "::1"), environ={}).token is None  # loopback
    assert serve.settings(_args("--host", "localhost"), environ={}).token is None
    with pytest.raises(ValueError, match="not an origin"):
        serve.settings(_args("--allow-origin", "http://app.example/page"), environ={})


# ----------------------------------------------------------------------------- edges

def test_a_text_of_exactly_the_runs_length_is_whole_and_one_more_token_is_cut(start, loaded):
    classifier, info, device = loaded
    tokenizer = data.get_tokenizer()
    n = info["max_length"]
    exact, longer = "hi" + " hi" * (n - 1), "hi" + " hi" * n
    assert len(tokenizer.encode(exact)) == n and len(tokenizer.encode(longer)) == n + 1
    srv = start()
    _, _, body = ask(srv, raw(srv.port, body=json.dumps({"texts": [exact, longer]}).encode()))
    whole, cut = body["predictions"]
    assert whole["truncated"] is False and cut["truncated"] is True
    # Both are classified on the same first n tokens, as in training.
    ids = data.encode(exact, tokenizer, n, pad=info["padding"])
    with torch.no_grad():
        probs = torch.softmax(classifier(torch.tensor([ids], device=device)) /
                              evaluate.temperature(info), dim=-1)[0]  # calibrated
    assert list(whole["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)
    assert cut["probabilities"] == pytest.approx(whole["probabilities"], abs=1e-6)


def test_classes_of_a_spam_like_text_come_back_in_the_runs_order(start, loaded):
    srv = start()
    _, _, body = ask(srv, raw(srv.port, body=json.dumps({"texts": [SPAM, HAM]}).encode()))
    want = evaluate.predict_proba([SPAM, HAM], *loaded)
    for p, w in zip(body["predictions"], want):
        assert list(p["probabilities"]) == loaded[1]["class_names"]
        assert p["probabilities"] == pytest.approx(w, abs=1e-6)
