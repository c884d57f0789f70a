"""Serving a run (`evaluate.py --serve`): requests per second and latency of POST /classify.

    python -m pytest bench/test_serve.py --benchmark-only

GPT-2 small with random weights (speed does not depend on the values) behind the real server on
127.0.0.1, texts padded to the chapter's 120 tokens as a run of finetune.py pads them, fp32 on
the CPU (cuda too where present). Each case sends requests of 1 or 32 texts, from one client or
from 4 at once (each on its own keep-alive connection), and records in extra_info the requests
and texts per second and the median and 90th-percentile latency of a request. Beside them, the
same texts through evaluate.class_probabilities without HTTP: the model's share of a request, so
that the server's overhead is a ratio measured in one run. The smoke pass (--benchmark-disable)
runs each case once on the tiny model.
"""

import http.client
import json
import statistics
import threading
import time

import pytest
import torch

import evaluate
import gpt
import serve

TEXTS = [
    "Are we still on for dinner tonight? I'll be there around 7, let me know if that's ok.",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize "
    "reward! To claim call 09061701461. Claim code KL341. Valid 12 hours only.",
    "Ok lar... Joking wif u oni...",
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to "
    "receive entry question(std txt rate)",
]
# (texts per request, clients sending at once, requests per client in one round)
CASES = [(1, 1, 1), (32, 1, 1), (1, 4, 2)]


def _devices():
    return ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)]
                      if torch.cuda.is_available() else [])


@pytest.fixture(scope="module", params=_devices())
def served(request, sizes):
    """A random-weights classifier of the measured size, served on 127.0.0.1 (a free port)."""
    device = torch.device(request.param)
    torch.manual_seed(123)
    model = gpt.add_classification_head(gpt.GPTModel(sizes.cfg), 2).to(device).eval()
    info = {"class_names": ["not spam", "spam"], "max_length": sizes.tokens, "padding": True,
            "batch_size": 8}
    classifier = evaluate.inference_classifier(model, info)  # as evaluate.load_run makes it
    server = serve.make_server(classifier, info, device, f"random-{request.param}", port=0,
                               log=False, predict=evaluate.predict_proba)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server, device
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _client(port, texts, count, latencies):
    """Send `count` requests of `texts` on one keep-alive connection, noting each latency."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"texts": texts})
    try:
        for _ in range(count):
            start = time.perf_counter()
            conn.request("POST", "/classify", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            latencies.append(time.perf_counter() - start)
            assert response.status == 200 and len(answer["predictions"]) == len(texts), answer
    finally:
        conn.close()


@pytest.mark.parametrize("n_texts, clients, per_client", CASES,
                         ids=[f"{n}text-{c}client" for n, c, _ in CASES])
def test_classify_requests(benchmark, served, sizes, n_texts, clients, per_client):
    server, device = served
    port = server.server_address[1]
    texts = [TEXTS[i % len(TEXTS)] for i in range(n_texts)]
    latencies, done = [], [0]  # every request's latency; how many the rounds so far sent

    def one_round():
        threads = [threading.Thread(target=_client, args=(port, texts, per_client, latencies))
                   for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        assert len(latencies) == done[0] + clients * per_client, "a client failed; see above"
        done[0] = len(latencies)

    slow = n_texts > 1 and device.type == "cpu" and not sizes.tiny
    benchmark.group = f"serve /classify ({device.type})"
    start = time.perf_counter()
    benchmark.pedantic(one_round, rounds=3 if slow else 10, warmup_rounds=1)
    wall = time.perf_counter() - start
    # Round times: the benchmark's own statistics where it ran; the smoke pass times its one run.
    rounds = benchmark.stats.stats.data if benchmark.enabled else [wall]
    timed = latencies[-len(rounds) * clients * per_client:]  # leave out the warm-up round
    requests = clients * per_client
    seconds = statistics.mean(rounds)
    benchmark.extra_info.update(
        device=device.type, torch=torch.__version__, threads=torch.get_num_threads(),
        model=f"{sizes.cfg.n_layers} layers x {sizes.cfg.emb_dim}", tokens=sizes.tokens,
        texts_per_request=n_texts, clients=clients, requests_per_s=requests / seconds,
        texts_per_s=requests * n_texts / seconds,
        latency_median_ms=1000 * statistics.median(timed),
        latency_p90_ms=1000 * sorted(timed)[int(0.9 * (len(timed) - 1))], tiny=sizes.tiny)


@pytest.mark.parametrize("n_texts", [1, 32], ids=["1text", "32text"])
def test_classify_without_http(benchmark, served, sizes, n_texts):
    """The model's share: class_probabilities on the same texts, without the server, in a
    thread of its own as the server runs it (here, under load, the main thread ran it 6x slower)."""
    server, device = served
    texts = [TEXTS[i % len(TEXTS)] for i in range(n_texts)]

    def call():
        probs, _ = serve.class_probabilities(texts, server.classifier, server.tokenizer,
                                             server.info, device, server.predict,
                                             lock=server.model_lock)
        assert len(probs) == n_texts

    slow = n_texts > 1 and device.type == "cpu" and not sizes.tiny
    benchmark.group = f"serve /classify ({device.type})"

    def in_thread():
        t = threading.Thread(target=call)
        t.start()
        t.join()

    benchmark.pedantic(in_thread, rounds=3 if slow else 10, warmup_rounds=1)
    if benchmark.enabled:
        seconds = benchmark.stats.stats.mean
        benchmark.extra_info.update(device=device.type, texts_per_request=n_texts,
                                    texts_per_s=n_texts / seconds, tiny=sizes.tiny)
