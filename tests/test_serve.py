"""`diffusion-lm serve`: the OpenAI-compatible API on a free loopback port.

Most tests serve an echo model (the real demo tokenizer and template, exact logits), so answers can
be compared exactly; one test runs the real command on a tiny model in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from diffusion_lm.backbone import ScratchBackbone
from diffusion_lm.cli import main
from diffusion_lm.pipeline import PromptRecord, answer_prompts, build_sampler
from diffusion_lm.serve import create_app
from diffusion_lm.serve.scheduler import BatchScheduler, Job, QueueFull

from .conftest import TINY
from .serving import EchoLM, ServerThread, free_port

openai = pytest.importorskip("openai", reason="the openai client is a test extra: pip install -e '.[test]'")

CHAT = "/v1/chat/completions"


pytestmark = pytest.mark.usefixtures("one_thread")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def expected(lm: EchoLM, text: str, seed: int, canvas: int = 16, **sampler) -> str:
    """The answer of one request decoded alone (no server, no batch)."""
    from diffusion_lm.data.conversation import Turn

    rows, _ = answer_prompts(lm, [PromptRecord(0, [Turn("user", text)], text)],
                             sampler=build_sampler(**sampler), canvas_length=canvas, seed=seed, batch_size=1)
    return rows[0]["answer"]


def stats(url: str, **headers) -> dict:
    return httpx.get(url + "/stats", headers=headers).json()


# ------------------------------------------------------------------------------ openai client
def test_openai_client_completion_and_stream(template):
    lm = EchoLM(template)
    with ServerThread(create_app(lm, model_name="echo")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["echo"]
        reply = client.chat.completions.create(model="echo", messages=user("Hello there, how are you?"),
                                               seed=7, max_tokens=12)
        answer = reply.choices[0].message.content
        assert answer == expected(lm, "Hello there, how are you?", 7, canvas=12)
        assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
        assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
        assert reply.model_extra["diffusion"]["seed"] == 7
        greedy = client.chat.completions.create(model="echo", messages=user("Привет, как дела?"),
                                                extra_body={"diffusion": {"preset": "greedy"}})
        assert greedy.choices[0].message.content == "Привет, как дела?"  # the echo, exactly

        stream = client.chat.completions.create(model="echo", messages=user("Hello there, how are you?"),
                                                seed=7, max_tokens=12, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer  # a text-only client concatenates deltas and gets the answer
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
        states = [c.model_extra["diffusion"] for c in chunks if "diffusion" in (c.model_extra or {})]
        assert states[0]["step"] == 0 and states[0]["masked"] == 12 and states[0]["slots"] == [None] * 12
        steps = [s["step"] for s in states[:-1]]
        assert steps == list(range(len(steps))) and len(steps) > 3  # every forward is an event
        masked = [s["masked"] for s in states]
        assert masked == sorted(masked, reverse=True) and masked[-1] == 0
        assert states[-1]["done"] and states[-1]["state"] == answer and states[-1]["seed"] == 7
        for s in states:  # the whole answer each time: text in committed slots, the placeholder elsewhere
            assert s["state"].count("\u2592") == s["masked"] and len(s["slots"]) <= 12


# -------------------------------------------------------------------------------- batching
def test_32_concurrent_requests_are_batched_and_each_answered_as_alone(template):
    lm = EchoLM(template, delay=0.01)
    app = create_app(lm, model_name="echo", max_batch_size=8, max_wait=0.05)
    prompts = [f"request number {i} says {'hello' if i % 2 else 'привет'}" for i in range(32)]
    with ServerThread(app) as url:
        def ask(i: int) -> tuple[int, dict]:
            body = {"messages": user(prompts[i]), "seed": 1000 + i, "max_tokens": 10, "stream": i % 4 == 0}
            if not body["stream"]:
                r = httpx.post(url + CHAT, json=body, timeout=120)
                return r.status_code, r.json()
            text = ""
            with httpx.stream("POST", url + CHAT, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        text += delta.get("content") or ""
                return r.status_code, {"choices": [{"message": {"content": text}}]}

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(ask, range(32)))
        counters = stats(url)
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == expected(lm, prompts[i], 1000 + i, canvas=10)
    assert counters["requests"]["completed"] == 32 and counters["requests"]["failed"] == 0
    assert counters["max_batch_size_seen"] > 1, counters
    assert sum(int(k) * v for k, v in counters["batch_sizes"].items()) == 32
    assert max(lm.batch_sizes) > 1
    assert counters["queued"] == 0 and counters["running"] == 0


def test_requests_with_different_settings_are_not_mixed(template):
    lm = EchoLM(template, delay=0.01)
    with ServerThread(create_app(lm, model_name="echo", max_batch_size=8, max_wait=0.05)) as url:
        def ask(i: int) -> str:
            body = {"messages": user(f"text {i}"), "seed": i, "max_tokens": 8 + i % 2}
            return httpx.post(url + CHAT, json=body, timeout=60).json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(8)))
    assert answers == [expected(lm, f"text {i}", i, canvas=8 + i % 2) for i in range(8)]


def test_scheduler_batches_by_key_bounds_its_queue_and_drops_cancelled_jobs():
    loop = asyncio.new_event_loop()
    gate, seen = threading.Event(), []

    def run(jobs: list[Job]) -> None:
        gate.wait(10)  # the first batch holds the worker while the others queue up
        seen.append([job.payload for job in jobs])
        for job in jobs:
            job.finish(job.payload)

    scheduler = BatchScheduler(run, max_batch_size=3, max_wait=0.01, max_queue=5)
    scheduler.start()
    try:
        jobs = [Job(key=key, payload=i, stream=False, loop=loop) for i, key in enumerate("aaabaa")]
        scheduler.submit(jobs[0])
        deadline = time.monotonic() + 10
        while scheduler.stats()["running"] != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        for job in jobs[1:]:
            scheduler.submit(job)
        with pytest.raises(QueueFull) as full:
            scheduler.submit(Job(key="a", payload=99, stream=False, loop=loop))
        assert full.value.retry_after >= 1
        scheduler.cancel(jobs[2])  # its client left while it was queued
        gate.set()
        while scheduler.stats()["requests"]["completed"] < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        counters = scheduler.stats()
    finally:
        scheduler.stop()
        loop.close()
    assert seen == [[0], [1, 4, 5], [3]]  # oldest first; same key together, up to max_batch_size
    assert counters["batch_sizes"] == {"1": 2, "3": 1} and counters["max_batch_size_seen"] == 3
    assert counters["requests"] == {"submitted": 6, "completed": 5, "failed": 0, "cancelled": 1,
                                    "rejected": 1}
    assert counters["queued"] == 0 and counters["running"] == 0


# ------------------------------------------------------------------------------- bad input
BAD = [
    ("malformed JSON", b'{"messages": [', None),
    ("not an object", b"[1, 2]", None),
    ("unknown field", {"messages": user("hi"), "temprature": 0.5}, "temprature"),
    ("unknown diffusion field", {"messages": user("hi"), "diffusion": {"stepz": 3}}, "diffusion.stepz"),
    ("no messages", {"messages": []}, "messages"),
    ("missing messages", {"max_tokens": 4}, "messages"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ("empty content", {"messages": [{"role": "user", "content": "  "}]}, "messages[0]"),
    ("last turn not the user's", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ("prompt too long", {"messages": user("word " * 400)}, "messages"),
    ("max_tokens zero", {"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
    ("max_tokens too large", {"messages": user("hi"), "max_tokens": 100000}, "max_tokens"),
    ("max_tokens not a number", {"messages": user("hi"), "max_tokens": "many"}, "max_tokens"),
    ("negative temperature", {"messages": user("hi"), "temperature": -1}, "temperature"),
    ("top_p above 1", {"messages": user("hi"), "top_p": 1.5}, "top_p"),
    ("n > 1", {"messages": user("hi"), "n": 2}, "n"),
    ("stop strings", {"messages": user("hi"), "stop": ["\n"]}, "stop"),
    ("zero steps", {"messages": user("hi"), "diffusion": {"steps": 0}}, "diffusion.steps"),
    ("steps and threshold", {"messages": user("hi"), "diffusion": {"steps": 3, "threshold": 0.9}},
     "diffusion.steps"),
    ("unknown preset", {"messages": user("hi"), "diffusion": {"preset": "turbo"}}, "diffusion.preset"),
    ("top_p on a greedy preset", {"messages": user("hi"), "top_p": 0.5, "diffusion": {"preset": "greedy"}},
     "top_p"),
    ("seed out of range", {"messages": user("hi"), "seed": 2**70}, "seed"),
    ("a penalty", {"messages": user("hi"), "presence_penalty": 0.5}, "presence_penalty"),
    ("an image part",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
]


def test_each_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(template):
    lm = EchoLM(template)
    with ServerThread(create_app(lm, model_name="echo")) as url:
        for what, body, param in BAD:
            kwargs = {"content": body,
                      "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
                else {"json": body}
            r = httpx.post(url + CHAT, **kwargs)
            assert r.status_code == 400, (what, r.text)
            error = r.json()["error"]
            assert error["param"] == param, (what, error)
            assert error["type"] == "invalid_request_error" and error["message"], (what, error)
            if param:
                assert param.split("[")[0].split(".")[-1] in error["message"], (what, error)
        long = httpx.post(url + CHAT, json={"messages": user("word " * 400)}).json()["error"]
        assert long["code"] == "context_length_exceeded" and "128 positions" in long["message"]
        wrong = httpx.post(url + CHAT, json={"model": "gpt-4", "messages": user("hi")})
        assert wrong.status_code == 404 and wrong.json()["error"]["param"] == "model"
        assert httpx.get(url + "/v1/nothing").status_code == 404
        assert httpx.post(url + "/v1/infill",
                          json={"text": "no hole here"}).json()["error"]["param"] == "text"
        huge = httpx.post(url + CHAT, content=b"{" + b" " * (5 << 20) + b"}",
                          headers={"content-type": "application/json"})
        assert huge.status_code == 413
        # still serving, nothing left behind
        ok = httpx.post(url + CHAT,
                        json={"messages": user("still there?"), "diffusion": {"preset": "greedy"}})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "still there?"
        assert httpx.get(url + "/health").json()["status"] == "ok"
        counters = stats(url)
    assert counters["requests"]["submitted"] == 1 and counters["queued"] == 0 and counters["running"] == 0


def test_full_queue_answers_429_with_retry_after(template):
    lm = EchoLM(template, delay=0.1)
    app = create_app(lm, model_name="echo", max_batch_size=1, max_wait=0.0, max_queue=1)
    with ServerThread(app) as url, httpx.Client(timeout=60) as client:
        body = {"messages": user("one two three four five six"), "max_tokens": 8, "stream": True}
        with client.stream("POST", url + CHAT, json=body) as running:
            lines = running.iter_lines()
            while '"step": 1' not in next(lines):  # the first request is being decoded
                pass
            queued = threading.Thread(target=lambda: httpx.post(url + CHAT, json={**body, "stream": False},
                                                                timeout=60))
            queued.start()
            deadline = time.monotonic() + 10
            while stats(url)["queued"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(url + CHAT, json=body)
            assert r.status_code == 429
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            for _ in lines:
                pass
        queued.join()
        counters = stats(url)
    assert counters["requests"]["rejected"] == 1 and counters["requests"]["completed"] == 2


def test_client_disconnect_mid_stream_cancels_the_request(template):
    lm = EchoLM(template, delay=0.05)
    with ServerThread(create_app(lm, model_name="echo")) as url:
        body = {"messages": user("a long answer that takes many steps to unmask"), "max_tokens": 24,
                "stream": True, "diffusion": {"preset": "greedy"}}
        with httpx.Client(timeout=60) as client, client.stream("POST", url + CHAT, json=body) as r:
            lines = r.iter_lines()
            while '"step": 2' not in next(lines):
                pass
        # the client is gone: the batch (this request alone) is aborted and the worker freed
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counters = stats(url)
            if counters["aborted_batches"] == 1 and counters["running"] == 0:
                break
            time.sleep(0.02)
        assert counters["requests"]["cancelled"] == 1 and counters["aborted_batches"] == 1, counters
        forwards = len(lm.batch_sizes)
        assert forwards < 24  # stopped long before the answer was done
        time.sleep(0.2)
        assert len(lm.batch_sizes) == forwards  # and nothing keeps running for it
        # a non-streamed request whose client times out is cancelled too
        long = {**body, "stream": False, "messages": user("hello " * 30)}  # 24 forwards: 1.2 s
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + CHAT, json=long, timeout=0.3)
        deadline = time.monotonic() + 10
        while stats(url)["aborted_batches"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        counters = stats(url)
        assert counters["requests"]["cancelled"] == 2 and counters["aborted_batches"] == 2, counters
        after = httpx.post(url + CHAT,
                           json={**body, "stream": False, "max_tokens": 8, "messages": user("next")})
        assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == "next"


def test_api_key_is_checked_on_the_api_and_not_on_the_page(template):
    app = create_app(EchoLM(template), model_name="echo", api_key="s3cret")
    with ServerThread(app) as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        bad = httpx.post(url + CHAT, json={"messages": user("hi")}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/stats").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="echo", messages=user("hi")).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/health").status_code == 200
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "<textarea" in page.text
        assert httpx.get(url + "/static/app.js").status_code == 200


class FailingLM(EchoLM):
    """An echo model whose forward pass fails on any prompt that contains "boom"."""

    def denoise(self, ids, attention_mask, query):
        if self.template.encode_text("boom")[0] in ids.tolist()[0]:
            raise RuntimeError("device lost")
        return super().denoise(ids, attention_mask, query)


def test_a_failing_batch_is_a_500_for_its_requests_only(template):
    with ServerThread(create_app(FailingLM(template), model_name="echo")) as url:
        r = httpx.post(url + CHAT, json={"messages": user("boom")})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="device lost"):
            list(client.chat.completions.create(model="echo", messages=user("boom"), stream=True))
        parts = [{"type": "text", "text": "fine "}, {"type": "text", "text": "again"}]
        reply = client.chat.completions.create(model="echo",
                                               messages=[{"role": "developer", "content": "Be brief."},
                                                                       {"role": "user", "content": parts}],
                                               extra_body={"diffusion": {"preset": "greedy"}})
        assert reply.choices[0].message.content == "fine again"
        counters = stats(url)
    assert counters["requests"]["failed"] == 2 and counters["requests"]["completed"] == 1


# ---------------------------------------------------------------------------------- infill
def test_infill_endpoint_fills_holes_and_streams_the_text(template):
    lm = EchoLM(template)
    with ServerThread(create_app(lm, model_name="echo")) as url:
        body = {"text": "Dear [[MASK:3]],\nthanks for [[MASK:2]]!", "seed": 3}
        r = httpx.post(url + "/v1/infill", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "infill" and len(out["fills"]) == 2
        assert out["text"] == f"Dear {out['fills'][0]},\nthanks for {out['fills'][1]}!"
        events = []
        with httpx.stream("POST", url + "/v1/infill", json={**body, "stream": True}) as s:
            for line in s.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
        assert events[0]["diffusion"]["masked"] == 5 and events[0]["diffusion"]["state"].count("\u2592") == 5
        assert events[-1]["text"] == out["text"] and events[-1]["diffusion"]["done"]
        masked = [e["diffusion"]["masked"] for e in events]
        assert masked == sorted(masked, reverse=True)


# --------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def export_folder(tmp_path_factory):
    """A tiny untrained model saved as an export folder (what `diffusion-lm serve --model` loads)."""
    from diffusion_lm import MaskedDiffusionLM
    from diffusion_lm.export import export_model

    model = MaskedDiffusionLM(ScratchBackbone(**TINY), canvas_length=12, health_check=False)
    return str(export_model(model, tmp_path_factory.mktemp("serve") / "tiny", verify=False))


def test_serve_command_serves_a_model_folder(export_folder):
    port = free_port()
    env = {**os.environ, "DIFFUSION_LM_API_KEY": "k", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "diffusion_lm", "serve", "--model", export_folder, "--port", str(port),
               "--served_model_name", "tiny", "--max_wait_ms", "5", "--device", "cpu", "--preset", "fast"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).json()["status"] == "ok":
                    break
            except httpx.HTTPError:
                pass
            alive = proc.poll() is None and time.monotonic() < deadline
            assert alive, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=user("Привет!"), max_tokens=6, seed=1)
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6
        chunks = list(client.chat.completions.create(model="tiny", messages=user("Hello"), max_tokens=6,
                                                     stream=True))
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert len([c for c in chunks if "diffusion" in (c.model_extra or {})]) >= 2
        card = client.models.retrieve("tiny")
        assert card.model_extra["max_model_len"] == TINY["max_position_embeddings"]
        assert card.model_extra["diffusion"]["default_max_tokens"] == 12
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "batch of 1 request(s) completed" in out  # the batch log


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    for args, needle in [(["--model", str(tmp_path / "none")], "no such checkpoint"),
                         (["--model", "x", "--steps", "0"], "--steps must be >= 1"),
                         (["--model", "x", "--max_batch_size", "0"], "--max_batch_size must be >= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
