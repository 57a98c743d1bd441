"""The chat page in headless Chromium: the answer unmasks step by step and ends as the API's answer.

Uses the system's Chromium (Debian: `apt-get install chromium`) through Playwright; browser
downloads are not needed. Skipped where either is missing.
"""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from diffusion_lm.serve import create_app

from .serving import EchoLM, ServerThread

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="no Chromium installed (Debian: apt-get install chromium; "
                                "or set CHROMIUM=/path/to/chrome): the web page test drives a system browser")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is a test extra: pip install -e '.[test]'")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Records every rendered state of the newest answer (its data-step changes once per server event).
RECORDER = """
window.__states = [];
new MutationObserver(() => {
  const answers = document.querySelectorAll('.msg.assistant .answer');
  const a = answers[answers.length - 1];
  if (!a || a.dataset.step === undefined) return;
  const rec = {n: answers.length, step: a.dataset.step, masked: Number(a.dataset.masked),
               done: a.dataset.done === '1', text: a.textContent,
               fresh: a.querySelectorAll('.slot.fresh').length};
  const last = window.__states[window.__states.length - 1];
  if (!last || last.n !== rec.n || last.step !== rec.step || last.done !== rec.done) {
    window.__states.push(rec);
  }
}).observe(document, {subtree: true, childList: true, attributes: true, characterData: true});
"""


def _ask(page, text: str, turn: int) -> list[dict]:
    page.fill("#prompt", text)
    page.click("#send")
    page.wait_for_selector(f".msg.assistant:nth-of-type({2 * turn}) .answer[data-done='1']", timeout=60_000)
    return [s for s in page.evaluate("window.__states") if s["n"] == turn]


def test_page_unmasks_the_answer_live_and_ends_with_the_api_answer(template, tmp_path):
    lm = EchoLM(template, delay=0.04)  # a visible pace: one server event per forward
    with ServerThread(create_app(lm, model_name="echo")) as url, sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=FLAGS)
        try:
            page = context.new_page()
            page.add_init_script(RECORDER)
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#model').textContent.startsWith('echo')")
            page.fill("#seed", "42")
            page.fill("#max_tokens", "12")
            conversation = []
            for turn, text in enumerate(["Hello there, how are you today?", "Привет! Как у тебя дела?"],
                                        start=1):
                states = _ask(page, text, turn)
                final = states[-1]
                live = [s for s in states if not s["done"]]
                # step by step: every forward is rendered, masks go down, tokens appear in place
                assert [int(s["step"]) for s in live] == list(range(len(live))) and len(live) > 4, states
                assert live[0]["masked"] == 12 and live[0]["text"] == "\u2592" * 12
                assert [s["masked"] for s in live] == sorted((s["masked"] for s in live), reverse=True)
                partial = [s for s in live if 0 < s["masked"] < 12]
                assert partial and all(s["text"].count("\u2592") == s["masked"] for s in live)
                assert any(s["fresh"] > 0 for s in live[1:])  # newly committed tokens are highlighted
                conversation.append({"role": "user", "content": text})
                api = httpx.post(url + "/v1/chat/completions",
                                 json={"model": "echo", "messages": conversation, "seed": 42,
                                       "max_tokens": 12}).json()
                answer = api["choices"][0]["message"]["content"]
                assert final["done"] and final["text"] == answer
                conversation.append({"role": "assistant", "content": answer})
            # Cyrillic round-trips through the page
            assert "Привет" in final["text"] or "дела" in final["text"]
            assert page.locator(".msg.user").all_text_contents()[1] == "Привет! Как у тебя дела?"
        finally:
            context.close()
