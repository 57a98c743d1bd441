"""Regenerate the evaluation task files in ``data/eval/`` from text that installed packages ship.

    python tools/make_eval_tasks.py [--out data/eval]

* ``chat.jsonl``   -- first exchanges of chatterbot-corpus dialogs (BSD-3-Clause): English from the
  categories ``configs/demo.yaml`` does not train on (held out), Russian from every category;
* ``fim.jsonl``    -- small functions of the Python standard library (PSF License 2.0) with one
  middle line masked;
* ``bridge.jsonl`` -- three-turn chatterbot dialogs (the middle turn is the bridge) and consecutive
  lines of the Zen of Python (``this`` module, PSF License 2.0);
* ``edit.jsonl``   -- chatterbot answers and Zen lines with one word span marked for replacement.

The selection is deterministic (sorted files, fixed strides), so the output is the same on every
machine with the same package versions (chatterbot-corpus 1.3.3, the running Python's stdlib).
The schemas are documented in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import ast
import codecs
import contextlib
import importlib
import inspect
import io
import json
import textwrap
from pathlib import Path

from diffusion_lm.data.sources import chatterbot_records

ROOT = Path(__file__).resolve().parents[1]
DEMO_EN_CATEGORIES = {"greetings", "botprofile", "food", "conversations", "humor"}
FIM_MODULES = ["bisect", "colorsys", "heapq", "shlex", "textwrap", "fnmatch", "string", "statistics",
               "posixpath", "calendar", "base64", "quopri", "glob", "keyword", "operator"]
CHAT_PER_LANGUAGE = 12
FIM_RECORDS = 24


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def chat_records() -> list[dict]:
    """Held-out English prompts and Russian prompts with the corpus answer as the reference."""
    out = []
    english = [r for r in chatterbot_records("en") if r["category"] not in DEMO_EN_CATEGORIES]
    russian = chatterbot_records("ru")
    for language, records in (("en", english), ("ru", russian)):
        usable = [r for r in records if len(r["utterances"]) >= 2
                  and all(_text(u).strip() for u in r["utterances"][:2])]
        stride = max(1, len(usable) // CHAT_PER_LANGUAGE)
        for k, rec in enumerate(usable[::stride][:CHAT_PER_LANGUAGE]):
            prompt, answer = rec["utterances"][0].strip(), rec["utterances"][1].strip()
            out.append({"id": f"chat-{language}-{k}", "language": language,
                        "source": f"chatterbot-corpus/{language}/{rec['category']}",
                        "messages": [{"role": "user", "content": prompt}], "reference": answer})
    return out


def _functions(module_name: str):
    module = importlib.import_module(module_name)
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.end_lineno is not None:
            text = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
            yield node.name, text


def fim_records() -> list[dict]:
    """Functions of 4-9 lines, at most 360 characters, without docstrings; the middle body line is masked."""
    out = []
    for module_name in FIM_MODULES:
        for name, text in sorted(_functions(module_name)):
            body = text.splitlines()
            if not 4 <= len(body) <= 9 or len(text) > 360 or '"""' in text or "'''" in text:
                continue
            k = len(body) // 2
            line = body[k]
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "def ", "class ", "@")) or stripped.endswith(":"):
                continue
            indent = line[: len(line) - len(line.lstrip())]
            prefix = "\n".join(body[:k]) + "\n" + indent
            suffix = "\n" + "\n".join(body[k + 1 :])
            ast.parse(prefix + stripped + suffix)  # the original must parse
            out.append({"id": f"fim-{module_name}.{name}", "language": "python",
                        "source": f"cpython Lib/{module_name}.py", "prefix": prefix, "middle": stripped,
                        "suffix": suffix})
    stride = max(1, len(out) // FIM_RECORDS)
    out = out[::stride][:FIM_RECORDS]
    seen: dict[str, int] = {}
    for rec in out:  # a module may define a name twice (per platform): keep ids unique
        seen[rec["id"]] = seen.get(rec["id"], 0) + 1
        if seen[rec["id"]] > 1:
            rec["id"] += f"-{seen[rec['id']]}"
    return out


def _zen_lines() -> list[str]:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    zen = codecs.decode(this.s, "rot13")  # stored ROT13-encoded
    return [line.strip() for line in zen.splitlines()[2:] if line.strip()]


def bridge_records() -> list[dict]:
    """Three-turn dialogs (EN, RU) and three consecutive Zen lines: the middle one is the bridge."""
    out = []
    for language in ("en", "ru"):
        dialogs = [r for r in chatterbot_records(language) if len(r["utterances"]) >= 3
                   and all(_text(u).strip() and len(u) <= 200 and "\n" not in u.strip()
                           for u in r["utterances"][:3])]
        stride = max(1, len(dialogs) // 8)
        for k, rec in enumerate(dialogs[::stride][:8]):
            before, bridge, after = (u.strip() for u in rec["utterances"][:3])
            out.append({"id": f"bridge-{language}-{k}", "language": language,
                        "source": f"chatterbot-corpus/{language}/{rec['category']}",
                        "before": before, "bridge": bridge, "after": after})
    zen = _zen_lines()
    for k in range(0, min(len(zen) - 2, 12), 3):
        out.append({"id": f"bridge-zen-{k}", "language": "en", "source": "cpython Lib/this.py",
                    "before": zen[k], "bridge": zen[k + 1], "after": zen[k + 2]})
    return out


def _span(text: str, k: int) -> tuple[int, int]:
    """Character span of one or two words near the middle of ``text`` (punctuation excluded)."""
    words, pos = [], 0
    for word in text.split():
        start = text.index(word, pos)
        pos = start + len(word)
        core = word.strip(".,!?;:\"'()«»—-")
        if core:
            offset = word.index(core)
            words.append((start + offset, start + offset + len(core)))
    mid = len(words) // 2
    last = min(mid + (k % 2), len(words) - 1)
    return words[mid][0], words[last][1]


def edit_records() -> list[dict]:
    """Answers of at least five words with a middle span to rewrite; the reference is the original span."""
    out = []
    for language in ("en", "ru"):
        answers = [(u.strip(), r["category"]) for r in chatterbot_records(language)
                   for u in r["utterances"][1:2]
                   if len(_text(u).split()) >= 5 and len(u) <= 160 and "\n" not in u.strip()]
        stride = max(1, len(answers) // 8)
        for k, (text, category) in enumerate(answers[::stride][:8]):
            start, end = _span(text, k)
            out.append({"id": f"edit-{language}-{k}", "language": language,
                        "source": f"chatterbot-corpus/{language}/{category}", "text": text,
                        "span": [start, end], "reference": text[start:end]})
    for k, text in enumerate(line for line in _zen_lines() if len(line.split()) >= 5):
        if k >= 6:
            break
        start, end = _span(text, k)
        out.append({"id": f"edit-zen-{k}", "language": "en", "source": "cpython Lib/this.py", "text": text,
                    "span": [start, end], "reference": text[start:end]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "data" / "eval"), help="folder to write the files to")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("chat", chat_records()), ("fim", fim_records()), ("bridge", bridge_records()),
                       ("edit", edit_records())):
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {path}: {len(rows)} records")


if __name__ == "__main__":
    main()
