"""The OpenAI-compatible server, driven by the official `openai` client against a server on
127.0.0.1: models, completions and chat equal to `lmforge generate`'s greedy output, streams
that join to the non-streamed text, usage, 32 concurrent requests each equal to its answer
alone, and the limits (over-long input 400, full queue 503, wrong key 401, a disconnected
stream frees its slot)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from lmforge.cli import main
from lmforge.config import model_config
from lmforge.engine import Engine, SamplingParams
from lmforge.model.gpt import GPT
from lmforge.serve.api import Limits, Server, create_app
from lmforge.serve.batching import BatchEngine, QueueFull, Request
from lmforge.tokenizer import train_bpe
from lmforge.train.checkpoint import load

TEXT = "the cat sat on the mat and the dog ran in the park with a red ball " * 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, save_base):
    tok = train_bpe([TEXT], vocab_size=300)
    return save_base(tmp_path_factory.mktemp("serve") / "ckpt", tok, seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(checkpoint, api_key=None, slots=16, max_queue=64, start=True, slow=0.0):
    """A server on 127.0.0.1 in a thread -> (base url, engine)."""
    model, tokenizer = load(checkpoint)
    if slow:  # every forward takes at least this long: streams last long enough to cut
        model.register_forward_hook(lambda *a: time.sleep(slow))
    engine = BatchEngine(model, slots=slots, max_queue=max_queue, start=start)
    app = create_app(Server(engine, tokenizer, "tiny", Limits(), api_key))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None)  # no dictConfig
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.start()
        engine.shutdown(drain=False, timeout=10)


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def generate_cli(checkpoint, capsys, prompt: str, n: int, chat: bool = False) -> str:
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--temperature=0",
            f"--max-new-tokens={n}", *(["--chat"] if chat else [])]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    return out[len(prompt) if not chat else 0 :].removesuffix("\n")


def test_models_completions_and_chat_equal_generate_greedy(checkpoint, capsys):
    with serving(checkpoint) as (url, _):
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["tiny"]
        done = c.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0)
        assert done.choices[0].text == generate_cli(checkpoint, capsys, "the cat", 20)
        assert done.usage.completion_tokens == 20 and done.usage.prompt_tokens > 0
        chat = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi there"}], max_tokens=24,
            temperature=0,
        )  # fmt: skip
        expected = generate_cli(checkpoint, capsys, "hi there", 24, chat=True)
        assert chat.choices[0].message.content == expected
        assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_streamed_chunks_join_to_the_text_and_carry_usage_when_asked(checkpoint):
    with serving(checkpoint) as (url, _):
        c = client(url)
        messages = [{"role": "user", "content": "the dog"}]
        whole = c.chat.completions.create(model="tiny", messages=messages, max_tokens=30,
                                          temperature=0)  # fmt: skip
        chunks = list(c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=30, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ))  # fmt: skip
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        plain = list(c.completions.create(model="tiny", prompt="a red", max_tokens=12,
                                          temperature=0, stream=True))  # fmt: skip
        assert all(ch.usage is None for ch in plain)
        joined = "".join(ch.choices[0].text for ch in plain)
        assert joined == c.completions.create(model="tiny", prompt="a red", max_tokens=12,
                                              temperature=0).choices[0].text  # fmt: skip


def test_32_concurrent_requests_each_get_what_they_get_alone(checkpoint):
    prompts = [("the cat sat " * (1 + i % 5)).strip() for i in range(32)]
    lengths = [4 + (i * 7) % 40 for i in range(32)]
    with serving(checkpoint, slots=8) as (url, _):
        c = client(url)

        def ask(i):
            r = c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                     temperature=0)  # fmt: skip
            return r.choices[0].text

        alone = [ask(i) for i in range(32)]
        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, range(32)))
    assert together == alone


def test_sampling_with_a_seed_repeats_and_n_choices_differ(checkpoint):
    with serving(checkpoint) as (url, _):
        c = client(url)

        def ask():
            return c.completions.create(
                model="tiny", prompt="the", max_tokens=16, seed=7, n=2, temperature=1.0
            )

        first, second = ask(), ask()
        assert [x.text for x in first.choices] == [x.text for x in second.choices]
        assert first.choices[0].text != first.choices[1].text
        lp = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=3, logprobs=True, top_logprobs=2)  # fmt: skip
        content = lp.choices[0].logprobs.content
        assert len(content) == lp.usage.completion_tokens and len(content[0].top_logprobs) == 2


def test_limits_answer_in_openai_error_shape(checkpoint):
    with serving(checkpoint, api_key="sesame") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        c = client(url, "sesame")
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="cat " * 400, max_tokens=4)
        assert e.value.status_code == 400 and "maximum context length" in e.value.message
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="tiny", prompt="cat", max_tokens=4, temperature=9)
        r = httpx.post(f"{url}/v1/completions", content=b"{not json",
                       headers={"Authorization": "Bearer sesame"})  # fmt: skip
        assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}
        # unknown fields are ignored, not rejected
        r = c.completions.create(model="tiny", prompt="cat", max_tokens=2,
                                 extra_body={"frobnicate": True, "best_of": 3})  # fmt: skip
        assert r.usage.completion_tokens >= 1


def test_a_full_queue_answers_503_with_retry_after(checkpoint):
    with serving(checkpoint, slots=1, max_queue=2, start=False) as (url, engine):

        async def burst():
            async with httpx.AsyncClient(timeout=30) as http:
                body = {"prompt": "the cat", "max_tokens": 4}
                waiting = [asyncio.create_task(http.post(f"{url}/v1/completions", json=body))
                           for _ in range(2)]  # fmt: skip
                while engine.stats()["waiting"] < 2:
                    await asyncio.sleep(0.01)
                refused = await http.post(f"{url}/v1/completions", json=body)
                engine.start()
                return refused, [await t for t in waiting]

        refused, served = asyncio.run(burst())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "overloaded"
    assert [r.status_code for r in served] == [200, 200]


def test_a_client_that_disconnects_mid_stream_frees_its_slot(checkpoint):
    with serving(checkpoint, slow=0.02) as (url, engine):
        body = {"prompt": "the", "max_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.stats()["running"] == 1
        deadline = time.time() + 1.0  # 100 tokens would take >= 2 s
        while engine.stats()["running"] and time.time() < deadline:
            time.sleep(0.02)
        assert engine.stats() == {"running": 0, "waiting": 0}


def test_the_engine_queue_is_bounded_and_a_prompt_must_fit():
    model = torch.nn.Linear(1, 1)  # never run: the engine is not started
    model.config = type("C", (), {"block_size": 8, "n_layer": 1, "kv_heads": 1, "head_dim": 1,
                                  "vocab_size": 4, "sliding_window": None})()  # fmt: skip
    engine = BatchEngine(model, slots=1, max_queue=1, start=False)
    params = SamplingParams(max_new_tokens=2)
    engine.submit(Request([1, 2], params, events=lambda e: None))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], params, events=lambda e: None))
    with pytest.raises(ValueError, match="context"):
        engine.submit(Request(list(range(8)), params, events=lambda e: None))
    json.dumps(engine.stats())


@pytest.mark.parametrize(
    "variant",
    [
        dict(pos_encoding="learned"),
        dict(n_head=4, n_kv_head=2),
        dict(n_head=4, n_kv_head=1, sliding_window=6),
        dict(n_head=4, n_kv_head=1, sliding_window=4, global_tokens=2),
    ],  # fmt: skip
    ids=["learned", "rope_gqa", "mqa_sliding_window", "mqa_window_global"],
)
def test_prompts_packed_beside_running_decodes_get_what_they_get_alone(variant):
    """Chunked prefill: each request joins while others decode (request i+1 is submitted at
    request i's (i+2)-th token; 3 slots for 6 requests, so some wait for a freed slot), its
    prompt packed into the same forward as their decode tokens, with prompts longer than the
    sliding window. Every greedy answer equals the uncached one of that prompt alone."""
    torch.manual_seed(0)
    cfg = model_config(preset="tiny", vocab_size=65, tie_embeddings=False, init_std=0.1, **variant)
    model = GPT(cfg).eval()
    prompts = [[5, 17, 3, 44, 9, 12, 30, 2, 8], [8, 1], [60, 2, 33, 4], [7] * 12, [3], [9, 4, 1]]
    lengths = [12, 6, 16, 9, 12, 5]
    alone = [
        Engine(model).generate([p], SamplingParams(n, temperature=0, use_cache=False))[0]
        for p, n in zip(prompts, lengths)
    ]
    engine = BatchEngine(model, slots=3)
    got = [[] for _ in prompts]
    finished = threading.Semaphore(0)

    def events(i):
        def on(event):
            if event[0] == "token":
                got[i].append(event[1])
                if len(got[i]) == i + 2 and i + 1 < len(prompts):
                    submit(i + 1)
            else:
                finished.release()

        return on

    def submit(i):
        engine.submit(Request(prompts[i], SamplingParams(lengths[i], temperature=0), events(i)))

    submit(0)
    for _ in prompts:
        assert finished.acquire(timeout=60)
    engine.shutdown()
    assert got == alone


def test_sigterm_drains_the_stream_in_flight_then_exits(tmp_path, save_base):
    import signal
    import subprocess
    import sys

    tok = train_bpe([TEXT], vocab_size=300)
    long_context = save_base(tmp_path / "long", tok, seed=3, block_size=2048)
    port = free_port()
    argv = [sys.executable, "-m", "lmforge", "serve", "--checkpoint", str(long_context),
            "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                httpx.get(f"{url}/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"prompt": "the", "max_tokens": 2000, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        after = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            lines = (line for line in r.iter_lines() if line)
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            after = list(lines)
        assert after[-1] == "data: [DONE]"
        usage = json.loads(after[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 2000
        assert len(after) > 100  # most of the answer came after the signal
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it drained
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health")
    finally:
        proc.kill()


def test_the_chat_repl_answers_and_resets_through_a_terminal(checkpoint, capsys):
    import sys

    pexpect = pytest.importorskip("pexpect")
    expected = generate_cli(checkpoint, capsys, "hello there", 12, chat=True)
    argv = ["-m", "lmforge", "chat", "--checkpoint", str(checkpoint), "--temperature", "0",
            "--max-new-tokens", "12"]  # fmt: skip
    repl = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=60)
    repl.expect("you> ")
    repl.sendline("hello there")
    repl.expect("model> ")
    repl.expect("\r\nyou> ")
    assert repl.before.strip() == expected.strip()
    repl.sendline("/reset")
    repl.expect(r"\(new conversation\)")
    repl.sendline("/temp 0.5")
    repl.expect(r"\(temperature 0.5\)")
    repl.sendline("/quit")
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_the_chat_page_streams_an_answer_in_a_headless_browser(checkpoint, tmp_path):
    import os
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By

    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver):
        pytest.skip("no chromium + chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.binary_location = browser
    with serving(checkpoint, slow=0.02) as (url, _):
        page = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))
        try:
            page.get(url)
            # greedy through the page's temperature control: an answer that does not depend
            # on the draw (a sampled one could end after a token or two)
            page.execute_script("document.getElementById('temperature').value = 0")
            page.find_element(By.ID, "input").send_keys("hello")
            page.find_element(By.ID, "send").click()
            seen = set()
            deadline = time.time() + 60
            while time.time() < deadline:
                answers = page.find_elements(By.CSS_SELECTOR, ".assistant")
                if answers and answers[-1].text:
                    seen.add(len(answers[-1].text))
                if page.find_element(By.ID, "send").is_enabled() and seen:
                    break
                time.sleep(0.05)
            artifacts = os.environ.get("LMFORGE_ARTIFACTS") or tmp_path
            os.makedirs(artifacts, exist_ok=True)
            page.save_screenshot(os.path.join(artifacts, "chat_page.png"))
            assert len(seen) > 3, seen  # the text grew while it streamed
            assert page.find_element(By.CSS_SELECTOR, ".user").text == "you: hello"
            assert page.find_element(By.ID, "status").text == ""
        finally:
            page.quit()


def test_a_model_without_chat_tokens_still_chats_and_unknown_routes_are_openai_errors(
    tmp_path, save_base
):
    from lmforge.tokenizer import CharTokenizer

    chars = sorted(set(TEXT + "useristan:\n"))
    plain = save_base(tmp_path / "char", CharTokenizer(chars, with_eot=True), block_size=64)
    with serving(plain) as (url, _):
        c = client(url)
        r = c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the cat"}], max_tokens=20,
            temperature=0,
        )  # fmt: skip
        text = r.choices[0].message.content
        assert r.usage.completion_tokens >= 1 and "\nuser:" not in text
        missing = httpx.get(f"{url}/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "404"
