"""`evaluate.py --serve` (serve.py): the JSON API through the standard library's client, the
page in a real headless browser, and the command line (the URL it prints, Ctrl-C).

One tiny run made by finetune.py on a small SMS file the tests write is served on 127.0.0.1 for
the whole module. The browser tests
need Chromium and its driver from the system packages (Debian: apt-get install chromium
chromium-driver) and the selenium package (the test extra); without them they skip, saying so.
"""

import http.client
import json
import os
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
import ddp
import evaluate
import finetune
import serve

REPO = Path(__file__).resolve().parents[1]
HAM = "Are we still on for dinner tonight? I'll be there around 7."
pytestmark = pytest.mark.slow  # a finetune.py run, a subprocess, a browser

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
                              evaluate.temperature(info), dim=-1)[0]  # calibrated
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
