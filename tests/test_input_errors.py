"""Every bad option, data file or checkpoint is one line on stderr (exit 2), never a traceback, and
options are checked before any data is read."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from diffusion_lm import DataSource, DialogDataModule
from diffusion_lm.cli import main
from diffusion_lm.data import CanvasPolicy

from .conftest import DIALOGS, tiny_cli_args

GOOD = json.dumps(DIALOGS[0], ensure_ascii=False)
NOT_UTF8 = GOOD.replace("Hello", "Hel\xfflo").encode("latin-1")  # one byte that is not UTF-8
BAD_BYTE = len(GOOD) + 1 + NOT_UTF8.index(b"\xff")  # its offset when it is on line 2


def _file(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _fit(tmp_path, data, *extra):
    return ["fit"] + tiny_cli_args(tmp_path, data, *extra)


def _fit_source(tmp_path, source: str, *extra):
    args = [a for a in tiny_cli_args(tmp_path, Path("x")) if not a.startswith("--data.sources")]
    return ["fit"] + args + [f"--data.sources=[{source}]", *extra]


# (case, args(tmp_path, good data file) -> argv, expected text, whether data may be read first)
CASES = [
    ("malformed JSONL line", lambda t, d: _fit(t, _file(t, "bad.jsonl", f"{GOOD}\n{GOOD[:-5]}\n".encode())),
     "bad.jsonl): line 2 is not valid JSON", True),
    ("empty data file", lambda t, d: _fit(t, _file(t, "empty.jsonl", b"")), "empty.jsonl): the file is empty",
     True),
    ("blank data file", lambda t, d: _fit(t, _file(t, "blank.jsonl", b"\n\n")), "the file holds no records",
     True),
    ("non-UTF-8 data, strict",
     lambda t, d: _fit(t, _file(t, "latin.jsonl", GOOD.encode() + b"\n" + NOT_UTF8 + b"\n"),
                       "--data.strict=true"),
     f"latin.jsonl): line 2 is not valid UTF-8 (byte offset {BAD_BYTE})", True),
    ("NaN source weight", lambda t, d: _fit_source(t, f"{{path: {d}, format: messages, weight: .nan}}"),
     "weight must be a finite number > 0, got nan", False),
    ("infinite source weight", lambda t, d: _fit_source(t, f"{{path: {d}, format: messages, weight: .inf}}"),
     "weight must be a finite number > 0, got inf", False),
    ("negative learning rate", lambda t, d: _fit(t, d, "--model.learning_rate=-0.001"),
     "model.learning_rate must be a finite number > 0", False),
    ("batch_size 0", lambda t, d: _fit(t, d, "--data.batch_size=0"), "data.batch_size must be >= 1, got 0",
     False),
    ("time_eps 0", lambda t, d: _fit(t, d, "--model.time_eps=0"), "model.time_eps must be in (0, 1)", False),
    ("micro_batch_size 0", lambda t, d: _fit(t, d, "--model.micro_batch_size=0"),
     "model.micro_batch_size must be >= 1", False),
    ("negative warmup", lambda t, d: _fit(t, d, "--model.warmup_steps=-5"), "model.warmup_steps must be >= 0",
     False),
    ("fit, missing checkpoint", lambda t, d: _fit(t, d, f"--ckpt_path={t}/nope.ckpt"),
     "nope.ckpt: no such checkpoint file", False),
    ("fit, truncated checkpoint",
     lambda t, d: _fit(t, d, f"--ckpt_path={_file(t, 'cut.ckpt', b'PK' + bytes(100))}"),
     "cut.ckpt cannot be read", False),
    ("validate, missing checkpoint",
     lambda t, d: ["validate"] + tiny_cli_args(t, d, f"--ckpt_path={t}/gone.ckpt"),
     "gone.ckpt: no such checkpoint file", False),
    ("validate, truncated checkpoint",
     lambda t, d: ["validate"] + tiny_cli_args(t, d,
                                               f"--ckpt_path={_file(t, 'cut.ckpt', b'PK' + bytes(100))}"),
     "truncated or not a Lightning checkpoint", False),
    ("export from a truncated checkpoint",
     lambda t, d: ["export", "--ckpt_path", str(_file(t, "cut.ckpt", b"PK" + bytes(100))),
                   "--output_dir", str(t / "e")],
     "cut.ckpt cannot be read", False),
    ("generate --input not UTF-8",
     lambda t, d: ["generate", "--model", str(t / "m.ckpt"), "--input",
                   str(_file(t, "p.jsonl", b'{"prompt": "hi"}\n{"prompt": "caf\xe9"}\n'))],
     "p.jsonl line 2: not valid UTF-8 (byte offset 32)", False),
]


@pytest.mark.parametrize("case, argv, expected, reads_data", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(tmp_path, messages_jsonl, capsys, monkeypatch, case, argv, expected,
                               reads_data):
    if not reads_data:  # options and checkpoints are checked before any data file is opened
        def no_data(*args, **kwargs):
            raise AssertionError("data was read before the options were checked")

        monkeypatch.setattr("diffusion_lm.data.mix.load_raw", no_data)
    args = argv(tmp_path, messages_jsonl)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("diffusion-lm: error: ") and expected in last, err


def test_non_utf8_records_are_counted_skips(tmp_path):
    data = _file(tmp_path, "mixed.jsonl",
                 b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in DIALOGS)
                 + NOT_UTF8 + b"\n")
    from diffusion_lm.backbone import DEMO_TOKENIZER

    dm = DialogDataModule([DataSource(str(data), format="messages", language="en", val_size=0)],
                          tokenizer=DEMO_TOKENIZER, batch_size=4, max_length=96,
                          canvas=CanvasPolicy(length=16))
    dm.setup("fit")
    assert dm.skipped.count("non_utf8") == 1
    assert dm.summary["skipped"]["records"]["mixed/train"]["non_utf8"] == 1
    assert len(dm.train_dataset) == len(DIALOGS)


def test_chat_reports_a_non_utf8_line_and_goes_on(tmp_path, capsys, monkeypatch):
    from diffusion_lm.cli import chat as commands
    from diffusion_lm.pipeline import ChatReply

    class Session:
        def __init__(self, *args, **kwargs):
            self.seen = []

        def ask(self, text):
            self.seen.append(text)
            return ChatReply(f"echo {text}", [], 0, {})

    monkeypatch.setattr(commands, "load_with_sampler", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(commands, "ChatSession", Session)
    monkeypatch.setattr(sys, "stdin",
                        io.TextIOWrapper(io.BytesIO(b"Hello\nbad \xff line\nBye\n"), encoding="utf-8"))
    main(["chat", "--model", "unused"])
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["echo Hello", "echo Bye"]
    assert "diffusion-lm: error: stdin line 2 is not valid UTF-8 (byte offset 10); skipped" in captured.err
