"""`convsim serve`: the OpenAI-compatible API (plain HTTP and the official `openai` client), its limits
(400/401/403/413/429), a bounded load test, the chat page in a real headless Chromium, and the command.

Servers run in this process on 127.0.0.1 with a free port and are always shut down; each has its own
copy of the tiny run's model.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from convsim.data.schema import Message
from convsim.serve.app import create_app, running
from convsim.serve.schemas import Limits
from convsim.serve.jobs import fit_history
from convsim.serve.service import Service

from conftest import cli

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@contextlib.contextmanager
def serving(run_dir, **kw):
    """A Service + uvicorn on 127.0.0.1:<free port> in a thread; yields (base url, service)."""
    svc = Service.from_run(run_dir, **kw)
    try:
        with running(create_app(svc, loopback=True)) as url:
            yield url, svc
    finally:
        svc.close()


@pytest.fixture(scope="module")
def api(tiny_run):
    """The main server: API key required, default limits."""
    with serving(tiny_run, api_key=KEY) as (url, svc):
        yield url, svc


@pytest.fixture(scope="module")
def happy_vector(tiny_run, tmp_path_factory):
    """A real steering vector of the tiny run, saved as happy.safetensors."""
    from convsim.runs import open_run
    from convsim.steering.build import from_phrases

    model, tok = open_run(tiny_run).load()
    path = tmp_path_factory.mktemp("vectors") / "happy.safetensors"
    from_phrases(model, tok, {"i feel happy": 1.0, "i feel sad": -1.0}, layers=-1).save(path)
    return path


@pytest.fixture(scope="module")
def open_api(tiny_run, happy_vector):
    """A server without a key, a queue of two and the happy vector at strength 2, whose uses are recorded."""
    used = []
    with serving(tiny_run, limits=Limits(queue_size=2), steer_arg=f"{happy_vector}:2") as (url, svc):
        real = svc.steer_fn

        def recording(model, vector, strength):
            used.append(strength)
            return real(model, vector, strength)

        svc.steer_fn = recording
        svc.steer_used = used
        yield url, svc


def call(url, method, path, body=None, headers=None, raw: bytes | None = None, timeout=60):
    """(status, headers, body bytes) of one request."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        return r.status, r.headers, r.read()  # header names are case-insensitive
    finally:
        conn.close()


def chat(url, body, headers=AUTH, **kw):
    status, h, data = call(url, "POST", "/v1/chat/completions", body, headers, **kw)
    return status, h, data


def sse_events(data: bytes) -> list:
    text = data.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events[:-1]]


def greedy(url, messages, speaker="Ana", headers=AUTH, **extra):
    status, _, data = chat(
        url, {"model": f"convsim/{speaker}", "messages": messages, "temperature": 0, **extra}, headers
    )
    assert status == 200, data
    return json.loads(data)


# ----------------------------------------------------------------------------- the history budget


def test_history_is_capped_in_tokens(api):
    from convsim.data.examples import render, tag_ids

    _, svc = api
    tok, fmt = svc.entries[0].tok, svc.entries[0].fmt
    long = [Message("Ben" if i % 2 else "Ana", f"message number {i} " * 5) for i in range(3000)]
    kept = fit_history(tok, fmt, long, "Ana", 200)
    ids = render(tok, fmt, kept, "Ana").input_ids
    assert 100 < len(ids) <= 200 and kept[-1].text == long[-1].text
    huge = [Message("Ben", "word " * 50_000 + "the end")]
    kept = fit_history(tok, fmt, huge, "Ana", 64)
    ids = render(tok, fmt, kept, "Ana").input_ids
    assert len(ids) <= 64 and kept[0].text.endswith("the end")
    assert ids[-1:] == tag_ids(tok, fmt, "Ana")  # the prompt still ends with who speaks


# ----------------------------------------------------------------------------- the API over HTTP


def test_health_and_models(api):
    url, _ = api
    status, _, data = call(url, "GET", "/health")  # no key needed, nothing private
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, _, data = call(url, "GET", "/v1/models", headers=AUTH)
    assert status == 200
    ids = [m["id"] for m in json.loads(data)["data"]]
    assert ids == ["convsim/Ana", "convsim/Ben"]
    status, _, data = call(url, "GET", "/v1/models/convsim%2FBen", headers=AUTH)
    assert status == 200 and json.loads(data)["id"] == "convsim/Ben"
    status, _, data = call(url, "GET", "/v1/info", headers=AUTH)
    assert json.loads(data)["runs"][0]["speakers"] == ["Ana", "Ben"] and json.loads(data)["vectors"] == []


def test_completion_and_stream_agree(api):
    url, _ = api
    messages = [{"role": "user", "name": "Ben", "content": "hey how are you"}]
    body = greedy(url, messages, max_tokens=24)
    assert body["object"] == "chat.completion" and body["model"] == "convsim/Ana"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["content"] == "\n".join(body["convsim"]["messages"][0])
    assert body["usage"]["prompt_tokens"] > 0
    status, h, data = chat(
        url,
        {
            "model": "convsim/Ana",
            "messages": messages,
            "temperature": 0,
            "max_tokens": 24,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and h["Content-Type"].startswith("text/event-stream")
    events = sse_events(data)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == choice["message"]["content"]
    assert events[-2]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert events[-1]["usage"] == body["usage"]
    # n > 1 samples several bursts; a seed makes sampling repeatable
    body = greedy(url, messages, max_tokens=8, n=2, temperature=1.0, seed=3)
    again = greedy(url, messages, max_tokens=8, n=2, temperature=1.0, seed=3)
    assert len(body["choices"]) == 2 and body["choices"] == again["choices"]


def test_errors(api):
    url, _ = api
    ok = {"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def err(status, code, *args, **kw):
        got, _, data = chat(url, *args, **kw)
        assert got == status, data
        e = json.loads(data)["error"]
        assert set(e) >= {"message", "type", "code"} and e["code"] == code
        return e

    err(400, "invalid_json", None, raw=b'{"model": "convsim/Ana", "messages": [')
    err(400, "invalid_json", None, raw=b"\xff\xfe")
    err(400, "invalid_type", None, raw=b"[1, 2]")
    err(400, "invalid_json", None, raw=b"[" * 200_000 + b"]" * 200_000)
    err(400, "invalid_value", {**ok, "temperature": 5})
    err(400, "invalid_value", {**ok, "max_tokens": "many"})
    err(400, "invalid_value", {**ok, "stream": True, "n": 2})
    err(400, "invalid_value", {**ok, "model": None})
    err(400, "steering_unavailable", {**ok, "steer_strength": 3})
    err(404, "model_not_found", {**ok, "model": "gpt-4"})
    err(413, "request_too_large", None, raw=b" " * (Limits().max_body_bytes + 1))
    e = err(401, "invalid_api_key", ok, headers={})
    assert e["type"] == "invalid_request_error"
    err(401, "invalid_api_key", ok, headers={"Authorization": "Bearer wrong"})
    status, h, _ = call(url, "GET", "/v1/models", headers={"Authorization": "Basic " + KEY})
    assert status == 401 and h["WWW-Authenticate"] == "Bearer"
    err(403, "forbidden_origin", ok, headers={**AUTH, "Origin": "http://evil.example"})
    assert call(url, "GET", "/nope")[0] == 404
    assert call(url, "DELETE", "/v1/models", headers=AUTH)[0] == 405
    assert call(url, "GET", "/health")[0] == 200  # still fine after all that


def test_without_key_only_loopback_hosts(open_api):
    url, _ = open_api
    assert call(url, "GET", "/v1/models")[0] == 200
    status, _, data = call(url, "GET", "/v1/models", headers={"Host": "attacker.example:80"})  # DNS rebinding
    assert status == 403 and json.loads(data)["error"]["code"] == "forbidden_host"


def test_steer_strength_reaches_the_vector(open_api):
    url, svc = open_api
    info = json.loads(call(url, "GET", "/v1/info")[2])
    v = info["vectors"][0]
    assert (v["name"], v["default"], v["min"], v["max"]) == ("happy", 2.0, -4.0, 4.0)
    m = [{"role": "user", "content": "hi"}]
    greedy(url, m, headers={}, max_tokens=2)
    greedy(url, m, headers={}, max_tokens=2, steer_strength=-1.5)
    greedy(url, m, headers={}, max_tokens=2, steer_strength=0)  # 0: no hook at all
    assert svc.steer_used == [2.0, -1.5]
    assert chat(url, {"model": "Ana", "messages": m, "steer_strength": 1e9}, {})[0] == 400


def test_real_steering_vector(tiny_run, tmp_path):
    steering = pytest.importorskip("convsim.steering.build")
    from convsim.steering.apply import active_hooks
    from convsim.runs import open_run

    model, tok = open_run(tiny_run).load()
    v = steering.from_phrases(model, tok, {"i feel happy": 1.0, "i feel sad": -1.0}, layers=-1)
    v.save(tmp_path / "happy.safetensors")
    with serving(tiny_run, steer_arg=f"{tmp_path / 'happy.safetensors'}:8") as (url, svc):
        assert json.loads(call(url, "GET", "/v1/info")[2])["vectors"][0]["default"] == 8.0
        m = [{"role": "user", "content": "are you coming tonight?"}]
        replies = {
            s: greedy(url, m, headers={}, max_tokens=12, steer_strength=s)["choices"][0]["message"]["content"]
            for s in (0, 8, -8, 64)
        }
        assert len(set(replies.values())) > 1, replies  # steering changes what the model says
        assert active_hooks(svc.model) == 0  # and leaves no hook behind


def test_full_queue_answers_429_and_loses_nothing(open_api):
    url, svc = open_api
    body = {"model": "convsim/Ben", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    results = {}

    def send(i):
        results[i] = chat(url, body, {})

    threads = []
    with svc.model_lock:  # the worker takes one job and waits; the queue (2) fills up
        threads.append(threading.Thread(target=send, args=(0,)))
        threads[-1].start()
        deadline = time.time() + 20
        while not svc.busy and time.time() < deadline:
            time.sleep(0.01)
        for i in (1, 2):
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
        while svc.queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)
        status, h, data = chat(url, body, {})
        assert status == 429 and int(h["Retry-After"]) >= 1
        assert json.loads(data)["error"]["code"] == "rate_limit_exceeded"
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [0, 1, 2] and all(r[0] == 200 for r in results.values())


def test_load_200_concurrent_requests(api):
    url, svc = api
    n = 200

    def one(i):
        body = {
            "model": "convsim/" + ("Ana", "Ben")[i % 2],
            "max_tokens": 8,
            "stream": i % 3 == 0,
            "messages": [{"role": "user", "content": f"message {i}: are you coming tonight?"}],
        }
        try:
            status, h, data = chat(url, body, timeout=90)
        except Exception as e:  # a dropped or hung connection fails the test below
            return ("lost", repr(e))
        if status == 200:
            if body["stream"]:
                sse_events(data)
            else:
                assert json.loads(data)["choices"][0]["message"]["role"] == "assistant"
        elif status == 429:
            assert int(h["Retry-After"]) >= 1
        return (status, None)

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.time() - t0
    statuses = [r[0] for r in results]
    assert len(results) == n and set(statuses) <= {200, 429}, [r for r in results if r[0] not in (200, 429)][:3]
    assert statuses.count(200) >= 1 + Limits().queue_size // 2
    assert seconds < 75, f"{n} requests took {seconds:.0f}s"
    status, _, data = call(url, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
    assert greedy(url, [{"role": "user", "content": "still there?"}], max_tokens=4)["choices"]


# ----------------------------------------------------------------------------- the official client


def test_openai_client(api):
    import openai

    url, _ = api
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["convsim/Ana", "convsim/Ben"]
    messages = [
        {"role": "user", "name": "Ben", "content": "are you coming tonight?"},
        {"role": "assistant", "content": "haha ok"},
        {"role": "user", "content": "see you"},
    ]
    r = client.chat.completions.create(model="convsim/Ana", messages=messages, temperature=0, max_tokens=16)
    want = greedy(url, messages, max_tokens=16)["choices"][0]["message"]["content"]
    assert r.choices[0].message.content == want and r.usage.total_tokens > 0
    stream = client.chat.completions.create(
        model="convsim/Ana", messages=messages, temperature=0, max_tokens=16, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="convsim/Nobody", messages=messages)


# ----------------------------------------------------------------------------- the page, in Chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    # a missing browser fails the test, never skips it: the page is part of what is shipped
    assert Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists(), (
        f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
        "apt-get install -y chromium chromium-driver"
    )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(fn, timeout=60, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_chat_page_streams_a_reply(api, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = api
    # a message the tiny model answers with some text, and that greedy answer from the API
    for text in ["hey how are you", "are you coming tonight?", "i love pizza so much", "lol yes", "hi"]:
        want = greedy(url, [{"role": "user", "name": "Ben", "content": text}])["choices"][0]["message"]["content"]
        if want.strip():
            break
    assert want.strip(), "the tiny model answered nothing to every probe"
    d = browser
    d.get(url + "/")
    state = lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    wait_for(lambda: state() == "needs-key", what="the API key prompt")
    d.find_element(By.ID, "key").send_keys(KEY + Keys.TAB)
    wait_for(lambda: state() == "idle", what="the page to load the speakers")
    assert d.find_element(By.ID, "them").get_attribute("value") == "Ana"
    assert d.find_element(By.ID, "me").get_attribute("value") == "Ben"
    assert not d.find_element(By.ID, "steer-box").is_displayed()
    temp = d.find_element(By.ID, "temperature")
    temp.clear()
    temp.send_keys("0")
    d.find_element(By.ID, "input").send_keys(text + Keys.ENTER)
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ben"]'), what="my message")
    wait_for(
        lambda: state() == "idle" and d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ana"]'),
        what="the streamed reply",
    )
    got = [
        e.find_element(By.CLASS_NAME, "text").text for e in d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ana"]')
    ]
    assert "\n".join(got) == want
    assert d.execute_script("return window.convsimChunks") >= 1
    assert not d.find_elements(By.CSS_SELECTOR, ".note.error")


def test_chat_page_shows_the_steering_slider(open_api, browser):
    from selenium.webdriver.common.by import By

    url, _ = open_api
    browser.get(url + "/")
    wait_for(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle", what="load")
    assert browser.find_element(By.ID, "steer-box").is_displayed()
    slider = browser.find_element(By.CSS_SELECTOR, 'input.steer[data-vector="happy"]')
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("value")) == ("-4", "4", "2")


# ----------------------------------------------------------------------------- the command


def test_serve_command(tiny_run):
    p = cli("serve", tiny_run, "--host", "0.0.0.0", check=False)
    assert p.returncode == 2 and "API key" in p.stderr and "Traceback" not in p.stderr
    env = {**os.environ, "CONVSIM_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "convsim", "serve", str(tiny_run), "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m.group(1)}"
        assert call(url, "GET", "/health")[0] == 200
        assert call(url, "GET", "/v1/models")[0] == 401  # the key came from the environment
        assert call(url, "GET", "/v1/models", headers=AUTH)[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
