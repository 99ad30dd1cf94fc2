"""`convsim serve` with several runs, per-request steering and dynamic batching: two concurrent requests
decoded in one batch each stop at their own speaker token and equal their lone greedy replies; runs of
one base share it; the official `openai` client with `extra_body` steering; attribution and the page's
"why?" in headless Chromium; 200 concurrent requests none lost or mixed up.

The tiny runs are trained here through the CLI (a second pair of people, Cy and Dee, whose speaker
tokens have the same ids as Ana's and Ben's).
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from convsim.data.schema import Message, write_conversations
from convsim.inference.nocopy import for_run
from convsim.serve.app import create_app, running
from convsim.serve.schemas import Limits
from convsim.serve.service import Service

from conftest import cli, synthetic_conversations, train_tiny
from test_serve import AUTH, KEY, call, chat, greedy, sse_events, wait_for
from test_serve import browser  # noqa: F401  (the Chromium fixture)

GREEDY = dict(temperature=0, max_new_tokens=48)


def lone(model, tok, fmt, guard, text, speaker, other, steer=()):
    """The reply `convsim.inference.generate.reply` gives alone (no server, no batch), greedy, with the run's
    copy guard as the server uses it."""
    import contextlib
    from convsim.inference.generate import SampleConfig, reply
    from convsim.steering.apply import steer as steer_cm

    with contextlib.ExitStack() as stack:
        for vector, strength in steer:
            stack.enter_context(steer_cm(model, vector, strength))
        return reply(model, tok, fmt, [Message(other, text)], speaker, SampleConfig(**GREEDY), guard=guard)[0]


@pytest.fixture(scope="module")
def cy_run(tmp_path_factory):
    """A second tiny-llama run, of Cy and Dee."""
    d = tmp_path_factory.mktemp("cydee")
    write_conversations(d / "data" / "conversations.jsonl", synthetic_conversations(seed=5, speakers=("Cy", "Dee")))
    return train_tiny(d / "data", d / "cydee")


@pytest.fixture(scope="module")
def vectors(tiny_run, tmp_path_factory):
    """Two real steering vectors of the tiny run: {name: path}."""
    from convsim.runs import open_run
    from convsim.steering.build import from_phrases

    model, tok = open_run(tiny_run).load()
    d = tmp_path_factory.mktemp("vec")
    from_phrases(model, tok, {"i feel happy": 1.0, "i feel sad": -1.0}, layers=-1).save(d / "happy.safetensors")
    from_phrases(model, tok, {"calm and quiet": 1.0, "angry and loud": -1.0}, layers=0).save(d / "calm.safetensors")
    return {"happy": d / "happy.safetensors", "calm": d / "calm.safetensors"}


@pytest.fixture(scope="module")
def rich_run(tiny_run, vectors, tmp_path_factory):
    """A copy of the tiny run with a vector in its steering/ directory and an attribution index."""
    d = tmp_path_factory.mktemp("rich") / "rich"
    shutil.copytree(tiny_run, d)
    (d / "steering").mkdir()
    shutil.copy(vectors["calm"], d / "steering" / "calm.safetensors")
    cli("tda", "index", d)
    return d


@pytest.fixture(scope="module")
def lone_tiny(tiny_run):
    from convsim.runs import open_run

    run = open_run(tiny_run)
    model, tok = run.load()
    return model, tok, run.fmt, for_run(run, tok)


# ----------------------------------------------------------------------------- batching


def test_two_concurrent_requests_share_a_batch_and_stop_on_their_own(tiny_run, lone_tiny):
    from convsim.data.examples import tag_ids

    model, tok, fmt, guard = lone_tiny
    svc = Service.from_run(tiny_run)
    try:
        blocker = svc.job_for({"model": "convsim/Ana", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
        a = svc.job_for(
            {
                "model": "convsim/Ana",
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": 0,
                "max_tokens": 48,
            }
        )
        # prompts whose lone greedy replies end at the other person's token, not at the token budget
        b = svc.job_for(
            {
                "model": "convsim/Ben",
                "messages": [{"role": "user", "content": "omg that is amazing"}],
                "temperature": 0,
                "max_tokens": 48,
                "stream": True,
            }
        )
        with svc.model_lock:  # the worker takes the blocker and waits; a and b queue up together
            svc.submit(blocker)
            wait_for(lambda: svc.busy, 20, "the worker to take the first job")
            svc.submit(a)
            svc.submit(b)
        assert blocker.wait(60)[0] == "done"
        got_a = a.wait(60)
        events_b = [b.wait(60)]
        while events_b[-1][0] == "delta":
            events_b.append(b.wait(60))
        assert a.batch[0] == b.batch[0] != blocker.batch[0] and a.batch[1] == 2  # one batch of two rows
        want_a = lone(model, tok, fmt, guard, "hi", "Ana", "Ben")
        want_b = lone(model, tok, fmt, guard, "omg that is amazing", "Ben", "Ana")
        assert got_a[0] == "done" and got_a[1] == [want_a] and got_a[2] == ["stop"]
        streamed = "".join(e[1] for e in events_b[:-1])
        assert events_b[-1][1] == [want_b] and streamed == "\n".join(want_b)
        # each row ended at the other person's speaker token, at a different length
        assert a.stopped_by == [tag_ids(tok, fmt, "Ben")] and b.stopped_by == [tag_ids(tok, fmt, "Ana")]
        assert got_a[3]["completion_tokens"] != events_b[-1][3]["completion_tokens"]
    finally:
        svc.close()


def test_sampled_rows_do_not_depend_on_their_batch(tiny_run):
    """A seeded sampled request gets the same reply alone and batched with others."""
    svc = Service.from_run(tiny_run)
    body = {
        "model": "convsim/Ana",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 1.0,
        "seed": 7,
        "max_tokens": 12,
        "n": 2,
    }
    try:
        alone = svc.job_for(body)
        svc.submit(alone)
        want = alone.wait(60)[1]
        others = [svc.job_for({**body, "seed": s}) for s in (1, 2, 3)]
        again = svc.job_for(body)
        with svc.model_lock:
            svc.submit(svc.job_for({**body, "max_tokens": 1}))
            wait_for(lambda: svc.busy, 20, "the worker")
            for j in (*others, again):
                svc.submit(j)
        assert again.wait(60)[1] == want and again.batch[1] == 8
    finally:
        svc.close()


# ----------------------------------------------------------------------------- many runs, one base


def page_picks_a_run(d, url, run_name, speakers, want):
    """The page lists the runs, and a person of the second run answers as that run's adapter does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d.get(url + "/")
    state = lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    wait_for(lambda: state() == "idle", what="the page to load")
    runs = Select(d.find_element(By.ID, "run"))
    assert [o.text for o in runs.options] == ["tiny", run_name] and d.find_element(By.ID, "run").is_displayed()
    runs.select_by_visible_text(run_name)
    them = Select(d.find_element(By.ID, "them"))
    assert [o.text for o in them.options] == speakers and them.first_selected_option.text == speakers[0]
    temp = d.find_element(By.ID, "temperature")
    temp.clear()
    temp.send_keys("0")
    d.find_element(By.ID, "input").send_keys(("hi" if speakers[0] == "Cy" else "lol yes") + Keys.ENTER)
    sel = f'.msg[data-speaker="{speakers[0]}"]'
    wait_for(lambda: state() == "idle" and d.find_elements(By.CSS_SELECTOR, sel), what="the streamed reply")
    got = [e.find_element(By.CLASS_NAME, "text").text for e in d.find_elements(By.CSS_SELECTOR, sel)]
    assert got == want


def test_many_runs_one_base(tiny_run, cy_run, lone_tiny, browser):  # noqa: F811
    from convsim.runs import open_run
    from convsim.modeling.speakers import speaker_ids

    ana, cy = open_run(tiny_run), open_run(cy_run)
    assert set(speaker_ids(lone_tiny[1], ["Ana", "Ben"]).values()) == set(
        speaker_ids(cy.load()[1], ["Cy", "Dee"]).values()
    )  # the same new token ids
    svc = Service.from_runs([tiny_run, cy_run])
    try:
        with running(create_app(svc)) as url:
            ids = [m["id"] for m in json.loads(call(url, "GET", "/v1/models")[2])["data"]]
            people = [f"{r}/{s}" for r, run in (("tiny", ana), ("cydee", cy)) for s in run.speakers]
            assert ids == [f"convsim/{p}" for p in people] + [f"convsim/{p.split('/')[1]}" for p in people]
            info = json.loads(call(url, "GET", "/v1/info")[2])
            assert [r["name"] for r in info["runs"]] == ["tiny", "cydee"]
            mem = info["memory"]
            base_model = open_run(tiny_run).load(adapter=False)[0]
            base_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters())
            assert mem["base_bytes"] == base_bytes  # one copy of the base
            assert set(mem["adapter_bytes"]) == {"tiny", "cydee"} and all(
                0 < b < base_bytes for b in mem["adapter_bytes"].values()
            )
            assert mem["total_bytes"] == base_bytes + sum(mem["adapter_bytes"].values())

            cy_model, cy_tok = cy.load()
            cy_guard = for_run(cy, cy_tok)
            cases = [
                ("convsim/tiny/Ana", "tiny", "hi", lone(*lone_tiny, "hi", "Ana", "Ben")),
                ("convsim/Ben", "tiny", "lol yes", lone(*lone_tiny, "lol yes", "Ben", "Ana")),
                ("convsim/cydee/Cy", "cydee", "hi", lone(cy_model, cy_tok, cy.fmt, cy_guard, "hi", "Cy", "Dee")),
                ("convsim/Dee", "cydee", "lol yes", lone(cy_model, cy_tok, cy.fmt, cy_guard, "lol yes", "Dee", "Cy")),
            ]

            def ask(case):
                model, _, text, _ = case
                return greedy(
                    url,
                    [{"role": "user", "content": text}],
                    speaker=model[len("convsim/") :],
                    headers={},
                    max_tokens=48,
                )

            with ThreadPoolExecutor(8) as pool:
                got = list(pool.map(ask, cases * 3))
            for (model, run_name, _, want), body in zip(cases * 3, got):
                assert body["model"] == model and body["convsim"]["run"] == run_name
                assert body["convsim"]["messages"][0] == want, (model, body)
            err = json.loads(chat(url, {"model": "convsim/tiny/Cy", "messages": []}, {})[2])["error"]
            assert err["code"] == "model_not_found"
            page_picks_a_run(browser, url, "cydee", cy.speakers, cases[2][3] if cy.speakers[0] == "Cy" else cases[3][3])
    finally:
        svc.close()


def test_a_run_of_another_base_is_refused(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    meta = json.loads((other / "run.json").read_text())
    meta["model"] = "tiny-gemma3"
    (other / "run.json").write_text(json.dumps(meta))
    p = cli("serve", tiny_run, other, "--port", "0", check=False)
    assert p.returncode == 2 and p.stderr.startswith("error:") and "tiny-gemma3" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- steering per request


@pytest.fixture(scope="module")
def steered(rich_run, vectors):
    """Key-less server for the rich run: happy from --steer (default 0), calm from the run's steering/."""
    svc = Service.from_runs([rich_run], steer_args=[f"{vectors['happy']}:0"])
    try:
        with running(create_app(svc)) as url:
            yield url, svc
    finally:
        svc.close()


def test_per_request_steering(steered, vectors, lone_tiny):
    from convsim.steering.vectors import SteeringVector

    url, svc = steered
    info = json.loads(call(url, "GET", "/v1/info")[2])
    assert [(v["name"], v["default"]) for v in info["vectors"]] == [("happy", 0.0), ("calm", 0.0)]
    happy, calm = (SteeringVector.load(vectors[n]) for n in ("happy", "calm"))
    text = "are you coming tonight?"
    settings = [
        ({}, ()),
        ({"happy": 8.0}, ((happy, 8.0),)),
        ({"happy": 8.0, "calm": -6.0}, ((happy, 8.0), (calm, -6.0))),
        ({"calm": 12.0}, ((calm, 12.0),)),
    ]
    wants = [lone(*lone_tiny, text, "Ana", "Ben", steer) for _, steer in settings]
    assert len({tuple(w) for w in wants}) > 1, wants  # the vectors change what the model says

    def ask(i):
        s = settings[i % len(settings)][0]
        return greedy(url, [{"role": "user", "content": text}], headers={}, max_tokens=48, steer=s)

    before = svc.batches
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    for i, body in enumerate(got):
        assert body["convsim"]["messages"][0] == wants[i % len(settings)], (i, settings[i % len(settings)][0])
    assert svc.batches - before >= len(settings)  # different steering never shares a batch
    from convsim.steering.apply import active_hooks

    assert active_hooks(svc.model) == 0


def test_steering_errors(steered):
    url, _ = steered
    ok = {"model": "convsim/Ana", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for steer, param in [
        ({"sad": 1.0}, "steer.sad"),
        ({"happy": 1e6}, "steer.happy"),
        ({"happy": "lots"}, "steer.happy"),
        ([1, 2], "steer"),
    ]:
        status, _, data = chat(url, {**ok, "steer": steer}, {})
        e = json.loads(data)["error"]
        assert status == 400 and e["code"] == "invalid_value" and e["param"] == param, (steer, e)
    status, _, data = chat(url, {**ok, "steer_strength": 2}, {})  # two vectors: which one?
    assert status == 400 and json.loads(data)["error"]["param"] == "steer_strength"


# ----------------------------------------------------------------------------- the official client


def test_openai_client_steering_streaming_and_errors(steered, lone_tiny, vectors):
    import openai
    from convsim.steering.vectors import SteeringVector

    url, _ = steered
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "name": "Ben", "content": "are you coming tonight?"}]
    want = lone(*lone_tiny, "are you coming tonight?", "Ana", "Ben", ((SteeringVector.load(vectors["happy"]), 8.0),))
    r = client.chat.completions.create(
        model="convsim/Ana", messages=messages, temperature=0, max_tokens=48, extra_body={"steer": {"happy": 8.0}}
    )
    assert r.choices[0].message.content == "\n".join(want) and r.model == "convsim/Ana"
    stream = client.chat.completions.create(
        model="convsim/rich/Ana",
        messages=messages,
        temperature=0,
        max_tokens=48,
        stream=True,
        extra_body={"steer": {"happy": 8.0}},
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "\n".join(want)
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="convsim/Ana", messages=messages, extra_body={"steer": {"happy": 1e9}})
    assert e.value.status_code == 400 and e.value.body["param"] == "steer.happy"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="convsim/rich/Zed", messages=messages)


# ----------------------------------------------------------------------------- attribution


def test_attribution(steered, rich_run, tiny_run):
    from convsim.runs import open_run
    from convsim.tda.query import Attributor

    url, _ = steered
    info = json.loads(call(url, "GET", "/v1/info")[2])
    assert info["runs"][0]["attribution"] is True
    status, _, data = call(url, "POST", "/v1/attribution", {"model": "convsim/Ana", "reply": "i love pizza", "k": 3})
    assert status == 200, data
    hits = json.loads(data)["data"]
    run = open_run(rich_run)
    want = Attributor(run, *run.load()).query(["i love pizza"], "Ana", k=3)
    assert [(h["text"], h["speaker"]) for h in hits] == [(h["text"], h["speaker"]) for h in want]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-3)
    assert hits[0]["score"] >= hits[-1]["score"] and hits[0]["text"] == "i love pizza so much"
    for body, code, status_ in [
        ({"model": "convsim/Ana", "reply": ""}, "invalid_value", 400),
        ({"model": "convsim/Ana", "reply": "x", "k": 0}, "invalid_value", 400),
        ({"model": "convsim/Nobody", "reply": "x"}, "model_not_found", 404),
    ]:
        s, _, d = call(url, "POST", "/v1/attribution", body)
        assert s == status_ and json.loads(d)["error"]["code"] == code
    with running(create_app(svc := Service.from_run(tiny_run))) as plain:  # a run without an index
        try:
            s, _, d = call(plain, "POST", "/v1/attribution", {"model": "convsim/Ana", "reply": "hi"})
            assert s == 404 and json.loads(d)["error"]["code"] == "attribution_unavailable"
        finally:
            svc.close()


# ----------------------------------------------------------------------------- robustness


def test_bad_input_changes_nothing(steered):
    url, svc = steered
    m = [{"role": "user", "content": "hi"}]
    before = greedy(url, m, headers={}, max_tokens=24)["choices"]
    served = svc.served
    for raw in [
        b'{"model": ',
        b'{"model": "convsim/Ana", "messages": [], "temperature": NaN}',
        json.dumps({"model": "convsim/Ana", "messages": m, "n": 99}).encode(),
        b" " * (svc.limits.max_body_bytes + 1),
    ]:
        assert call(url, "POST", "/v1/chat/completions", raw=raw)[0] in (400, 413)
    assert svc.served == served  # nothing reached the model
    assert greedy(url, m, headers={}, max_tokens=24)["choices"] == before


def test_vanished_and_slow_clients_do_not_stall_others(steered):
    url, svc = steered
    host, port = url.split("//")[1].split(":")
    body = json.dumps(
        {
            "model": "convsim/Ana",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 256,
            "temperature": 1.0,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    slow = socket.create_connection((host, int(port)))
    slow.sendall(head + body)  # then never reads its stream
    gone = socket.create_connection((host, int(port)))
    gone.sendall(head + body)
    gone.recv(10)
    gone.close()  # hangs up mid-stream
    half = socket.create_connection((host, int(port)))
    half.sendall(head[:30])  # a request that never finishes arriving
    try:
        t0 = time.time()
        assert greedy(url, [{"role": "user", "content": "lol yes"}], headers={}, max_tokens=8)["choices"]
        assert time.time() - t0 < 30
        assert json.loads(call(url, "GET", "/health")[2])["status"] == "ok"
    finally:
        slow.close()
        half.close()


def test_200_concurrent_requests_none_lost_none_mixed(tiny_run, lone_tiny):
    """Every reply is checked against its own request: greedy, so each must equal its lone reply."""
    texts = [
        "hey how are you",
        "are you coming tonight?",
        "i love pizza so much",
        "lol yes",
        "hi",
        "Not bad. Working late again.",
        "Maybe tomorrow then.",
    ]
    cases = [(t, s) for t in texts for s in ("Ana", "Ben")]
    wants = {(t, s): lone(*lone_tiny, t, s, "Ben" if s == "Ana" else "Ana") for t, s in cases}
    svc = Service.from_run(tiny_run, api_key=KEY, limits=Limits(queue_size=256))
    try:
        with running(create_app(svc)) as url:

            def one(i):
                text, speaker = cases[i % len(cases)]
                body = {
                    "model": "convsim/" + speaker,
                    "temperature": 0,
                    "max_tokens": 48,
                    "stream": i % 3 == 0,
                    "messages": [{"role": "user", "content": text}],
                    "user": str(i),
                }
                status, _, data = chat(url, body, AUTH, timeout=120)
                assert status == 200, data
                if body["stream"]:
                    events = sse_events(data)
                    got = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
                else:
                    got = json.loads(data)["choices"][0]["message"]["content"]
                return got == "\n".join(wants[(text, speaker)])

            with ThreadPoolExecutor(200) as pool:
                ok = list(pool.map(one, range(200)))
            assert len(ok) == 200 and all(ok), ok.count(False)
            assert svc.batches < 200 / 4  # batched, not one at a time
    finally:
        svc.close()


# ----------------------------------------------------------------------------- the page


def test_page_sliders_and_why(steered, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = steered
    d = browser
    d.get(url + "/")
    state = lambda: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")  # noqa: E731
    wait_for(lambda: state() == "idle", what="the page to load")
    sliders = d.find_elements(By.CSS_SELECTOR, "input.steer")
    assert [s.get_attribute("data-vector") for s in sliders] == ["happy", "calm"]
    temp = d.find_element(By.ID, "temperature")
    temp.clear()
    temp.send_keys("0")
    d.execute_script("const s = arguments[0]; s.value = s.max; s.dispatchEvent(new Event('input'));", sliders[0])
    top = float(d.execute_script("return arguments[0].value", sliders[0]))
    assert top == float(sliders[0].get_attribute("max"))
    # a message whose greedy reply the slider's top strength changes (the tiny run's replies are short)
    for text in ["are you coming tonight?", "hey how are you", "hi", "i love pizza so much"]:
        messages = [{"role": "user", "name": "Ben", "content": text}]
        want = greedy(url, messages, headers={}, steer={"happy": top, "calm": 0.0})["choices"][0]["message"]["content"]
        plain = greedy(url, messages, headers={})["choices"][0]["message"]["content"]
        if want != plain:
            break
    assert want != plain, "steering changed none of the replies"
    d.find_element(By.ID, "input").send_keys(text + Keys.ENTER)
    wait_for(
        lambda: state() == "idle" and d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ana"]'),
        what="the streamed reply",
    )
    got = [
        e.find_element(By.CLASS_NAME, "text").text for e in d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ana"]')
    ]
    assert "\n".join(got) == want  # the slider's strength reached the server
    d.find_elements(By.CSS_SELECTOR, '.msg[data-speaker="Ana"] button.why')[0].click()
    panel = d.find_element(By.ID, "why-panel")
    wait_for(lambda: panel.get_attribute("data-state") == "done", what="the why? panel")
    hits = panel.find_elements(By.CSS_SELECTOR, "li.hit")
    assert len(hits) == 5 and all(h.find_element(By.CLASS_NAME, "text").text for h in hits)
    assert not d.find_elements(By.CSS_SELECTOR, ".note.error")
