"""serve.py: the HTTP server and its page, and every fault a client can send answered in time.
"""

import argparse
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import torch

import data
import decisions
import ddp
import evaluate
import finetune
import serve

pytestmark = pytest.mark.slow  # a finetune.py run, a subprocess, a browser


# --------------------------------------------------------------------- the JSON API and the page

REPO = Path(__file__).resolve().parents[1]
HAM = "Are we still on for dinner tonight? I'll be there around 7."

SPAM = "WINNER!! You have been selected to receive a $1000 prize. Call 09061701461 to claim now!"


@pytest.fixture(scope="module")
def tiny_run(sms_run):
    """A finished run of finetune.py: the tiny checkpoint, a few steps on a small SMS file the
    tests make (conftest's sms_run, shared by the session), so that serving is tested without
    the real data."""
    return sms_run


@pytest.fixture(scope="module")
def loaded(tiny_run):
    device = ddp.select_device("cpu")
    classifier, info = evaluate.load_run(tiny_run, device)
    return classifier, info, device


@pytest.fixture(scope="module")
def server(loaded, tiny_run):
    """The run served on 127.0.0.1 (a free port) in a background thread; its base URL."""
    classifier, info, device = loaded
    srv = serve.make_server(classifier, info, device, tiny_run.name, port=0, log=False,
                            predict=evaluate.predict_proba)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def expected(texts, loaded):
    """What /classify should answer, from evaluate.classify, one text at a time."""
    classifier, info, device = loaded
    tokenizer = data.get_tokenizer()
    out = []
    for text in texts:
        label, prob = evaluate.classify(text, classifier, tokenizer, info, device)
        out.append((label, prob))
    return out


def request(base, path, body=None, method=None, headers=None, timeout=30):
    """(status, headers, parsed JSON or text) of one request, 4xx/5xx included."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    if head.get_content_type() == "application/json":
        return status, head, json.loads(raw)
    return status, head, raw.decode()


def post(base, texts, timeout=30):
    return request(base, "/classify", {"texts": texts}, timeout=timeout)


# ----------------------------------------------------------------------------- the API

def test_health_names_the_run(server, loaded, tiny_run):
    status, head, answer = request(server.base, "/health")
    assert status == 200 and head.get_content_type() == "application/json"
    assert answer["status"] == "ok"
    assert answer["run"] == tiny_run.name
    assert answer["classes"] == loaded[1]["class_names"] == ["not spam", "spam"]
    assert answer["device"] == "cpu"
    assert answer["max_texts"] == serve.MAX_TEXTS


def test_classify_answers_what_evaluate_classify_does(server, loaded):
    texts = [HAM, SPAM, "ok", "Free entry in 2 a wkly comp to win FA Cup final tkts"]
    status, _, answer = post(server.base, texts)
    assert status == 200
    predictions = answer["predictions"]
    assert len(predictions) == len(texts)
    names = loaded[1]["class_names"]
    for p, (label, prob) in zip(predictions, expected(texts, loaded)):
        assert list(p["probabilities"]) == names
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == label == max(p["probabilities"], key=p["probabilities"].get)
        assert p["probabilities"][label] == pytest.approx(prob, abs=1e-5)
        assert p["truncated"] is False


def test_long_texts_are_cut_as_in_training_and_flagged(server, loaded):
    info = loaded[1]
    tokenizer = data.get_tokenizer()
    head = " ".join(f"word{i}" for i in range(info["max_length"]))  # more tokens than max_length
    assert len(tokenizer.encode(head)) > info["max_length"]
    texts = [head + " and then one ending", head + " but another, quite different ending", HAM]
    _, _, answer = post(server.base, texts)
    first, second, short = answer["predictions"]
    assert first["truncated"] is True and second["truncated"] is True
    assert short["truncated"] is False
    # Only the first max_length tokens count, so the different endings make no difference
    # (up to float rounding: rows of one batch may be computed by differently tiled kernels).
    assert first["probabilities"] == pytest.approx(second["probabilities"], abs=1e-6)
    # ... and they are what the model gives the text encoded as finetune.py encodes it.
    classifier, info, device = loaded
    ids = data.encode(texts[0], tokenizer, info["max_length"], pad=info["padding"])
    with torch.no_grad():
        probs = torch.softmax(classifier(torch.tensor([ids], device=device)) /
                              decisions.temperature_of(info), dim=-1)[0]  # calibrated
    assert list(first["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)


def test_a_full_request_of_max_texts_is_answered(server):
    texts = [f"message number {i}" for i in range(serve.MAX_TEXTS)]
    status, _, answer = post(server.base, texts)
    assert status == 200 and len(answer["predictions"]) == serve.MAX_TEXTS


def test_keep_alive_serves_several_requests_on_one_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    try:
        for texts in ([HAM], [SPAM, HAM], [HAM]):
            conn.request("POST", "/classify", json.dumps({"texts": texts}),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200 and len(json.loads(r.read())["predictions"]) == len(texts)
        conn.request("GET", "/nowhere")
        r = conn.getresponse()
        assert r.status == 404 and "error" in json.loads(r.read())
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


BAD_REQUESTS = [
    ("malformed JSON", "/classify", b'{"texts": ["hi"', "POST", 400, "not valid JSON"),
    ("not UTF-8", "/classify", b'{"texts": ["\xff\xfe"]}', "POST", 400, "not UTF-8"),
    ("a list, not an object", "/classify", ["hi"], "POST", 400, 'no "texts"'),
    ("no texts", "/classify", {"text": "hi"}, "POST", 400, 'no "texts"'),
    ("texts not a list", "/classify", {"texts": "hi"}, "POST", 400, "must be a list"),
    ("no text at all", "/classify", {"texts": []}, "POST", 400, '"texts" is empty'),
    ("an empty text", "/classify", {"texts": ["hi", ""]}, "POST", 400, "texts[1] is empty"),
    ("a blank text", "/classify", {"texts": [" \n\t "]}, "POST", 400, "texts[0] is empty"),
    ("a text that is no string", "/classify", {"texts": ["hi", 3]}, "POST", 400,
     "texts[1] is not a string"),
    ("a null text", "/classify", {"texts": [None]}, "POST", 400, "texts[0] is not a string"),
    ("too many texts", "/classify", {"texts": ["hi"] * (serve.MAX_TEXTS + 1)}, "POST", 400,
     f"more than the {serve.MAX_TEXTS}"),
    ("a body over the limit", "/classify",
     {"texts": ["x" * (serve.MAX_BODY // 2)] * 2}, "POST", 413, "over"),
    ("an unknown path", "/predict", None, "GET", 404, "there is no /predict"),
    ("an unknown path, posted", "/predict", {"texts": ["hi"]}, "POST", 404, "there is no"),
    ("GET /classify", "/classify", None, "GET", 405, "takes POST"),
    ("POST to the page", "/", {"texts": ["hi"]}, "POST", 405, "takes GET"),
    ("DELETE /health", "/health", None, "DELETE", 405, "takes GET"),
]


@pytest.mark.parametrize("what, path, body, method, status, message", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_a_json_error_and_the_server_goes_on(server, what, path, body, method,
                                                              status, message):
    got, head, answer = request(server.base, path, body, method)
    assert got == status
    assert head.get_content_type() == "application/json"
    assert message in answer["error"]
    if status == 405:
        assert head["Allow"] in ("GET", "POST")
    # ... and the next request is answered as usual.
    got, _, answer = post(server.base, [HAM])
    assert got == 200 and answer["predictions"][0]["label"] in ("not spam", "spam")


def test_a_text_the_tokenizer_refuses_is_a_client_error(server):
    """tiktoken refuses "<|endoftext|>" inside a text; that is the request's fault, not a 500.
    (Should the tokenizer come to take it as plain text, the text is simply classified.)"""
    got, _, answer = post(server.base, ["hi", "a special <|endoftext|> token"])
    assert got in (200, 400), answer
    if got == 400:
        assert answer["error"].startswith("texts[1] cannot be tokenized")
    assert post(server.base, [HAM])[0] == 200


def raw_exchange(server, payload):
    """Send raw bytes, read until the server closes; the status line and JSON body."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_bodies_without_a_length_are_refused(server):
    status, answer = raw_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert " 411 " in status and "Content-Length" in answer["error"]
    status, answer = raw_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\n\r\n")
    assert " 411 " in status and "Content-Length" in answer["error"]
    status, answer = raw_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: lots\r\n\r\n")
    assert " 400 " in status and "not a byte count" in answer["error"]
    assert post(server.base, [HAM])[0] == 200


def test_a_huge_declared_body_is_refused_without_reading_it(server):
    status, answer = raw_exchange(server, b"POST /classify HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 99999999999\r\n\r\n{}")
    assert " 413 " in status and "over" in answer["error"]
    assert post(server.base, [HAM])[0] == 200


def test_concurrent_requests_are_all_answered_correctly(server, loaded):
    """8 threads x 6 requests of 1 to 4 texts each, every answer checked; bounded in time."""
    pool = [HAM, SPAM, "ok see you", "Call now for your free ringtone!", "lunch?", "URGENT win"]
    want = dict(zip(pool, expected(pool, loaded)))
    jobs = [[pool[(t + r + k) % len(pool)] for k in range(1 + (t + r) % 4)]
            for t in range(8) for r in range(6)]
    with ThreadPoolExecutor(max_workers=8) as ex:
        futures = [ex.submit(post, server.base, texts) for texts in jobs]
        done, not_done = wait(futures, timeout=120)
    assert not not_done, f"{len(not_done)} of {len(futures)} requests got no answer in 120 s"
    for texts, future in zip(jobs, futures):
        status, _, answer = future.result()
        assert status == 200
        assert [p["label"] for p in answer["predictions"]] == [want[t][0] for t in texts]
        for text, p in zip(texts, answer["predictions"]):
            assert p["probabilities"][p["label"]] == pytest.approx(want[text][1], abs=1e-5)


def test_server_binds_to_localhost_by_default(loaded):
    classifier, info, device = loaded
    srv = serve.make_server(classifier, info, device, "r", port=0, log=False,
                            predict=evaluate.predict_proba)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


# ----------------------------------------------------------------------------- the page (HTML)

def test_page_names_run_classes_and_device(server, tiny_run):
    status, head, page = request(server.base, "/")
    assert status == 200 and head.get_content_type() == "text/html"
    assert tiny_run.name in page and "not spam, spam" in page and ">cpu<" in page
    assert '<meta name="viewport"' in page and '<label for="text">' in page
    assert "{{" not in page.split("-->", 1)[1]  # every field filled in


def test_page_escapes_what_it_shows_and_works_from_any_folder(loaded, tmp_path, monkeypatch):
    classifier, info, device = loaded
    monkeypatch.chdir(tmp_path)  # the page is found beside evaluate.py, not in the cwd
    srv = serve.make_server(classifier, dict(info, class_names=["<b>a&b</b>", "c"]), device,
                            "<script>alert(1)</script>", port=0, log=False,
                            predict=evaluate.predict_proba)
    try:
        page = srv.page.decode()
    finally:
        srv.server_close()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    assert "&lt;b&gt;a&amp;b&lt;/b&gt;, c" in page


# ----------------------------------------------------------------------------- the command line

def test_cli_prints_the_url_serves_and_stops_cleanly_on_ctrl_c(tiny_run):
    proc = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), "--serve", "--run",
                             str(tiny_run), "--port", "0"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = _read_line(proc, timeout=120)
        assert line.startswith(f"Serving {tiny_run} (classes: not spam, spam; device: cpu) at "
                               "http://127.0.0.1:"), line
        url = line.split(" at ", 1)[1].split()[0]
        status, _, answer = post(url.rstrip("/"), [HAM])
        assert status == 200 and answer["predictions"][0]["label"] in ("not spam", "spam")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Stopped." in out
    assert '"POST /classify HTTP/1.1" 200' in err  # the access log


def _read_line(proc, timeout):
    """The first line of proc's stdout, or a failure after `timeout` seconds."""
    box = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    assert box and box[0], f"no URL printed in {timeout} s: {proc.poll()=}"
    return box[0].strip()


def test_cli_refuses_a_port_in_use_with_one_line(tiny_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--serve", "--run", str(tiny_run), "--port", str(port)])
    assert str(e.value.code).startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert "--port" in str(e.value.code)


@pytest.mark.parametrize("args, message", [
    (["--serve", "--text", "hi"], "--serve runs alone"),
    (["--serve", "--port", "70000"], "is not a port"),
])
def test_cli_refuses_bad_serve_flags(tiny_run, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--run", str(tiny_run)] + args)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the page (browser)

def _find_browser():
    """(chromium, chromedriver) paths, or a reason why the browser tests cannot run."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    chromium = os.environ.get("CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None)
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        return None, ("no headless browser: install Chromium and its driver (Debian: apt-get "
                      "install chromium chromium-driver), or set CHROMIUM and CHROMEDRIVER")
    return (chromium, driver), None


@pytest.fixture(scope="module")
def browser():
    found, reason = _find_browser()
    if not found:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1000,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(found[1]))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(driver, condition, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(condition)


def _shown_result(driver):
    """(label, [(class, percent text, bar fraction of its track)]) once a result shows."""
    from selenium.webdriver.common.by import By
    _wait(driver, lambda d: d.find_element(By.ID, "result").is_displayed()
          and d.find_element(By.ID, "label").text)
    rows = []
    for li in driver.find_elements(By.CSS_SELECTOR, "#bars li"):
        track = li.find_element(By.CLASS_NAME, "track")
        fill = li.find_element(By.CLASS_NAME, "fill")
        rows.append((li.find_element(By.CLASS_NAME, "name").text,
                     li.find_element(By.CLASS_NAME, "pct").text,
                     fill.size["width"] / track.size["width"]))
    return driver.find_element(By.ID, "label").text, rows


def _open(driver, server, width=1000, height=900):
    driver.set_window_size(width, height)
    driver.get(server.base + "/")
    return driver


def test_browser_type_click_and_read_the_label_and_bars(browser, server, loaded, tiny_run):
    from selenium.webdriver.common.by import By
    _open(browser, server)
    about = browser.find_element(By.CLASS_NAME, "about").text
    assert tiny_run.name in about and "not spam, spam" in about and "cpu" in about
    browser.find_element(By.ID, "text").send_keys(SPAM)
    browser.find_element(By.ID, "classify").click()
    label, rows = _shown_result(browser)
    _, _, answer = post(server.base, [SPAM])
    want = answer["predictions"][0]
    assert label == want["label"]
    assert [name for name, _, _ in rows] == loaded[1]["class_names"]
    for name, pct, fraction in rows:
        p = want["probabilities"][name]
        assert pct == f"{100 * p:.1f}%"
        assert fraction == pytest.approx(p, abs=0.02)  # the bar's length is the probability
    assert not browser.find_element(By.ID, "truncated").is_displayed()
    assert not browser.find_element(By.ID, "error").is_displayed()


def test_browser_keyboard_only(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    _open(browser, server)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "text"
    browser.switch_to.active_element.send_keys(HAM, Keys.CONTROL, Keys.ENTER)
    label, rows = _shown_result(browser)
    assert label == post(server.base, [HAM])[2]["predictions"][0]["label"] and len(rows) == 2
    # Tab reaches the button, and Enter on it classifies the new text.
    text = browser.find_element(By.ID, "text")
    text.clear()
    text.send_keys(SPAM, Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "classify"
    browser.execute_script("document.getElementById('result').hidden = true")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    label, _ = _shown_result(browser)
    assert label == post(server.base, [SPAM])[2]["predictions"][0]["label"]


def test_browser_shows_errors_and_the_truncation_note(browser, server, loaded):
    from selenium.webdriver.common.by import By
    _open(browser, server)
    text = browser.find_element(By.ID, "text")
    text.send_keys("   ")
    browser.find_element(By.ID, "classify").click()
    error = browser.find_element(By.ID, "error")
    _wait(browser, lambda d: error.is_displayed())
    assert "texts[0] is empty" in error.text and error.get_attribute("role") == "alert"
    assert not browser.find_element(By.ID, "result").is_displayed()
    text.clear()
    long_text = " ".join(f"word{i}" for i in range(loaded[1]["max_length"] + 10))
    browser.execute_script("arguments[0].value = arguments[1]", text, long_text)
    browser.find_element(By.ID, "classify").click()
    _shown_result(browser)
    assert browser.find_element(By.ID, "truncated").is_displayed()
    assert not error.is_displayed()


def test_browser_page_fits_a_phone(browser, server):
    from selenium.webdriver.common.by import By
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 360, "height": 740, "deviceScaleFactor": 2, "mobile": True})
    try:
        browser.get(server.base + "/")
        assert browser.execute_script("return window.innerWidth") == 360
        browser.find_element(By.ID, "text").send_keys(SPAM)
        browser.find_element(By.ID, "classify").click()
        _, rows = _shown_result(browser)
        assert len(rows) == 2 and all(0 <= f <= 1.01 for _, _, f in rows)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a 360px phone screen"
        assert browser.find_element(By.ID, "classify").size["height"] >= 40  # a touch target
        assert browser.find_element(By.ID, "text").size["width"] >= 300  # uses the width
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# ----------------------------------------------------------------------------- any classes

def test_a_three_class_run_of_own_data_is_served(tmp_path, tiny_weights, capsys):
    """Generic over the run's classes: a run on an own .jsonl file with 3 classes (per-batch
    padding, the flexible position) answers one probability per class, in the run's order."""
    words = {"sport": "match goal team", "weather": "rain sun cloud", "money": "bank cash loan"}
    rows = [{"text": f"{words[c].split()[i % 3]} news number {i}", "label": c}
            for i in range(30) for c in words]
    (tmp_path / "own.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run3"
    finetune.main(["--weights", str(tiny_weights), "--train-file", str(tmp_path / "own.jsonl"),
                   "--output-dir", str(run), "--device", "cpu", "--epochs", "1",
                   "--max-steps", "2", "--no-initial-eval"])
    capsys.readouterr()
    device = ddp.select_device("cpu")
    classifier, info = evaluate.load_run(run, device)
    srv = serve.make_server(classifier, info, device, run.name, port=0, log=False,
                            predict=evaluate.predict_proba)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        texts = ["goal for the team", "a loan from the bank at last"]
        status, _, answer = post(base, texts)
        assert status == 200
        want = evaluate.predict_proba(texts, classifier, info, device)
        for p, w in zip(answer["predictions"], want):
            assert list(p["probabilities"]) == info["class_names"] == sorted(words)
            assert p["probabilities"] == pytest.approx(w, abs=1e-6)
            assert p["label"] == max(w, key=w.get)
        assert request(base, "/health")[2]["classes"] == sorted(words)
        assert "money, sport, weather" in request(base, "/")[2]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


# ----------------------------------------------------- faults, deadlines, Host, Origin and token

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
                              decisions.temperature_of(info), dim=-1)[0]  # calibrated
    assert list(whole["probabilities"].values()) == pytest.approx(probs.tolist(), abs=1e-6)
    assert cut["probabilities"] == pytest.approx(whole["probabilities"], abs=1e-6)


def test_classes_of_a_spam_like_text_come_back_in_the_runs_order(start, loaded):
    srv = start()
    _, _, body = ask(srv, raw(srv.port, body=json.dumps({"texts": [SPAM, HAM]}).encode()))
    want = evaluate.predict_proba([SPAM, HAM], *loaded)
    for p, w in zip(body["predictions"], want):
        assert list(p["probabilities"]) == loaded[1]["class_names"]
        assert p["probabilities"] == pytest.approx(w, abs=1e-6)
