"""`diffusion-lm generate | infill | chat` on a tiny model trained for a few steps through the CLI."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import yaml

from diffusion_lm.cli import main, repeatable_lists
from diffusion_lm.errors import ConfigError
from diffusion_lm.sampling import PRESETS, SamplerConfig
from diffusion_lm.cli.generate import generate_command
from diffusion_lm.loading import load_for_inference
from diffusion_lm.pipeline import ChatSession, build_sampler, infill_texts
from diffusion_lm.sampling.policies import BlockWindow, SampleProposer, ScheduleSelector, ThresholdSelector

from .conftest import DIALOGS, REPO, TINY, tiny_cli_args, write_jsonl

MAX_POSITIONS = 128  # TINY's max_position_embeddings


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """One tiny model, trained for 3 steps by `diffusion-lm fit`, shared by every test here."""
    root = tmp_path_factory.mktemp("commands_run")
    data = root / "dialogs.jsonl"
    write_jsonl(data, DIALOGS)
    main(["fit"] + tiny_cli_args(root, data, "--model.health_check=false"))
    ckpts = sorted(root.rglob("*.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return str(ckpts[-1])


@pytest.fixture(scope="module")
def model(ckpt):
    return load_for_inference(ckpt, "cpu")


@pytest.fixture(scope="module")
def no_eos(model) -> str:
    """An inline --sampler: `fast` with EOS suppressed, so the untrained model's answers are not empty."""
    return "{preset: fast, suppress_tokens: [%d]}" % model.template.eos_id


def _error(args, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffusion-lm: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------ generate
def test_generate_prompts_print_answers_and_stats(ckpt, no_eos, capsys):
    main(["generate", "--model", ckpt, "--prompt", "Hello there", "--prompt", "Как дела?", "--sampler",
          no_eos, "--canvas_length", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert ">>> Hello there" in out and ">>> Как дела?" in out
    assert out.count("tokens/forward") == 2 and "[nfe " in out


def test_generate_jsonl_input_writes_answers_and_stats(ckpt, no_eos, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"id": "a", "prompt": "Hello there"},
        {"prompt": "Что нового?", "language": "ru"},
        {"id": "c",
         "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
                                 {"role": "user", "content": "And 3+3?"}]},
    ]) + "\n\n", encoding="utf-8")
    out1, out2 = tmp_path / "batched.jsonl", tmp_path / "single.jsonl"
    common = ["generate", "--model", ckpt, "--input", str(prompts), "--sampler", no_eos, "--canvas_length",
              "10"]
    main(common + ["--output", str(out1), "--batch_size", "3", "--trajectory", str(tmp_path / "t.html")])
    main(common + ["--output", str(out2), "--batch_size", "1"])
    rows = [json.loads(line) for line in out1.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["a", 1, "c"]
    assert [r["prompt"] for r in rows] == ["Hello there", "Что нового?", "And 3+3?"]
    assert "language" not in rows[0] and rows[1]["language"] == "ru"
    for r in rows:
        assert isinstance(r["answer"], str) and r["answer"]
        assert set(r["stats"]) == {"nfe", "tokens", "tokens_per_forward", "seconds"}
        assert 1 <= r["stats"]["nfe"] <= 10 and r["stats"]["tokens"] == 10
        assert r["stats"]["tokens_per_forward"] == pytest.approx(10 / r["stats"]["nfe"], rel=1e-3)
    # --batch_size only groups rows: the same rows come back in the same order. (Their answers are not
    # compared: this 3-step model's logits are near-ties, and a batch's padding width changes the
    # float rounding of its matrix kernels; see test_batch_size_never_changes_answers_of_a_row_local_model.)
    single = [json.loads(line) for line in out2.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["prompt"]) for r in single] == [(r["id"], r["prompt"]) for r in rows]
    assert all(r["answer"] and r["stats"]["tokens"] == 10 for r in single)
    page = (tmp_path / "t.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "And 3+3?" in page
    assert "wrote" in capsys.readouterr().err


class RowLocalDenoiser:
    """Logits from fixed random tables, indexed by the position in the row and (a hash of) the nearest
    decoded token to its left: a function of the row's own tokens only, bitwise the same in any batch."""

    def __init__(self, vocab_size: int, mask_id: int, eos_id: int, width: int = MAX_POSITIONS) -> None:
        g = torch.Generator().manual_seed(0)
        self.pos = torch.randn(width, vocab_size, generator=g) * 3
        self.tok = torch.randn(61, vocab_size, generator=g) * 3
        self.mask_id = mask_id
        self.pos[:, eos_id] -= 20.0  # answers fill their canvas

    def __call__(self, ids, attn, query):
        known = attn.bool() & (ids != self.mask_id)
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        left = torch.where(known, pos, torch.full_like(pos, -1)).cummax(1).values
        left = torch.cat([torch.full_like(left[:, :1], -1), left[:, :-1]], dim=1)
        prev = torch.where(left >= 0, ids.gather(1, left.clamp_min(0)), torch.zeros_like(left))
        logits = self.pos[: ids.shape[1]][None] + self.tok[prev % 61]
        logits[..., self.mask_id] = float("-inf")
        return logits[query]


def test_batch_size_never_changes_answers_of_a_row_local_model(template):
    """The sampler's promise (docs/sampling.md): with a denoiser whose rows do not depend on their
    batch, --batch_size changes nothing, for sampling presets too (per-row random streams)."""
    from diffusion_lm import MaskedDiffusionLM, ScratchBackbone
    from diffusion_lm.data import Turn
    from diffusion_lm.pipeline import PromptRecord, answer_prompts

    # answer_prompts goes through MaskedDiffusionLM.generate: a tiny model whose denoiser is the table
    stub = MaskedDiffusionLM(ScratchBackbone(**TINY), canvas_length=10, health_check=False)
    assert stub.template.prompt_ids([Turn("user", "Hi")]) == template.prompt_ids([Turn("user", "Hi")])
    assert stub.max_length == MAX_POSITIONS
    stub.denoise = RowLocalDenoiser(len(template.tokenizer), template.mask_id, template.eos_id)
    texts = ["Hello there", "Что нового?", "What is 2+2? And what is 3+3, please?", "Hi"]
    records = [PromptRecord(i, [Turn("user", t)], t) for i, t in enumerate(texts)]
    for preset in ("quality", "fast"):
        runs = [answer_prompts(stub, records, sampler=build_sampler(preset), seed=3, batch_size=b)[0]
                for b in (4, 3, 1)]
        answers = [[(r["answer"], r["stats"]["nfe"]) for r in rows] for rows in runs]
        assert answers[0] == answers[1] == answers[2], preset
        assert len({a for a, _ in answers[0]}) == len(texts)


def test_sampler_presets_yaml_files_and_flags(ckpt, tmp_path, capsys):
    for name in PRESETS:
        path = REPO / "configs" / "sampler" / f"{name}.yaml"
        from_file = SamplerConfig.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")))
        assert from_file == SamplerConfig.preset(name)
        assert build_sampler(sampler=str(path)) == SamplerConfig.preset(name)
    assert build_sampler() == SamplerConfig.preset("quality")
    assert build_sampler("fast", "{window: full}").window.name == "full"
    config = build_sampler("fast", steps=6, block_size=8, temperature=0.5, top_p=0.8)
    assert config.selector == ScheduleSelector(steps=6) and config.window == BlockWindow(8)
    assert config.proposer == SampleProposer(temperature=0.5, top_p=0.8)
    assert build_sampler("quality", threshold=0.7).selector == ThresholdSelector(0.7)
    assert build_sampler("quality", top_k=5).proposer == SampleProposer(temperature=0.7, top_p=0.9, top_k=5)
    # the file works through the CLI too
    main(["generate", "--model", ckpt, "--prompt", "Hello", "--sampler", "configs/sampler/fast.yaml",
          "--canvas_length", "4"])
    assert ">>> Hello" in capsys.readouterr().out


def test_repeated_list_flags_keep_literal_strings():
    argv = ["--model", "m", "--prompt", "null", "--prompt=- item", "--seed", "1", "--prompt", "[1, 2]"]
    out = repeatable_lists(generate_command, argv)
    assert out == ["--model", "m", "--prompt", json.dumps(["null", "- item", "[1, 2]"]), "--seed", "1"]


# -------------------------------------------------------------------------------------------- infill
def test_infill_leaves_unmasked_tokens_untouched(model):
    texts = ["def add(a, b):\n    [[MASK:6]]\n    return c",
             "The first paragraph ends here. [[MASK:5]] The second one starts here.",
             "I like [[MASK]] very much, and [[MASK:2]] too."]
    outputs, _ = infill_texts(model, texts, sampler=SamplerConfig.preset("fast"), default_slots=3)
    mask = model.template.mask_id
    for text, o in zip(texts, outputs):
        holes = {p for hole in o.holes for p in hole}
        assert sum(len(h) for h in o.holes) == o.input_ids.count(mask) == len(holes)
        assert [o.output_ids[i] for i in range(len(o.input_ids)) if i not in holes] == \
            [t for i, t in enumerate(o.input_ids) if i not in holes]
        assert all(o.output_ids[i] != mask for i in holes)
        head, tail = text.split("[[")[0], text.rsplit("]]", 1)[1]
        assert o.filled.startswith(head) and o.filled.endswith(tail)
    # the text outside the holes is its own tokens, in order: BOS, pieces, EOS
    tpl = model.template
    assert outputs[0].input_ids[:1] == [tpl.bos_id] and outputs[0].input_ids[-1] == tpl.eos_id
    head = tpl.encode_text("def add(a, b):\n    ")
    assert outputs[0].input_ids[1:1 + len(head)] == head
    # re-generating a span of an answer: the chat prompt comes first and stays untouched
    outputs, _ = infill_texts(model, ["Four, [[MASK:3]]."], prompt="What is 2+2?", sampler="greedy")
    from diffusion_lm.data import Turn

    prompt_ids = tpl.prompt_ids([Turn("user", "What is 2+2?")])
    assert outputs[0].output_ids[:len(prompt_ids)] == prompt_ids


def test_a_literal_mask_token_in_the_text_is_text_not_a_hole(ckpt, model, capsys):
    text = "x [MASK] y [[MASK:3]] z"
    (o,), _ = infill_texts(model, [text], sampler=SamplerConfig.preset("greedy"))
    mask = model.template.mask_id
    assert o.input_ids.count(mask) == 3 and [len(h) for h in o.holes] == [3]  # only the declared hole
    hole = set(o.holes[0])
    kept = [i for i in range(len(o.input_ids)) if i not in hole]
    assert [o.output_ids[i] for i in kept] == [o.input_ids[i] for i in kept]
    assert mask not in o.output_ids
    assert o.filled.startswith("x [MASK] y ") and o.filled.endswith(" z")
    main(["infill", "--model", ckpt, "--text", text, "--preset", "greedy"])
    out = capsys.readouterr().out
    assert out.startswith("x [MASK] y ") and out.rstrip("\n").endswith(" z")


def test_infill_command_prints_and_writes(ckpt, tmp_path, capsys):
    main(["infill", "--model", ckpt, "--text", r"def add(a, b):\n    [[MASK:6]]\n    return c", "--preset",
          "fast"])
    out = capsys.readouterr().out
    assert out.startswith("def add(a, b):\n    ") and out.endswith("\n    return c\n")
    source = tmp_path / "texts.jsonl"
    source.write_text(json.dumps({"id": "x", "text": "Paragraph one. [[MASK:4]] Paragraph two."}) + "\n",
                      encoding="utf-8")
    main(["infill", "--model", ckpt, "--input", str(source), "--output", str(tmp_path / "out.jsonl")])
    row = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert row["id"] == "x" and row["filled"].startswith("Paragraph one. ")
    assert row["filled"].endswith(" Paragraph two.")
    assert len(row["fills"]) == 1 and row["stats"]["nfe"] >= 1


# ---------------------------------------------------------------------------------------------- chat
def test_chat_piped_stdin_keeps_the_conversation(ckpt, no_eos, tmp_path, capsys, monkeypatch):
    transcript = tmp_path / "chat.jsonl"
    monkeypatch.setattr(sys, "stdin",
                        io.StringIO("Hello there\n\nAnd you?\n/reset\nКак дела?\n/quit\nnot read\n"))
    main(["chat", "--model", ckpt, "--sampler", no_eos, "--canvas_length", "6", "--transcript",
          str(transcript)])
    captured = capsys.readouterr()
    answers = captured.out.splitlines()
    assert len(answers) == 3 and all(answers)
    assert "conversation reset" in captured.err
    rows = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert [r["turn"] for r in rows] == [1, 2, 3] and [r["answer"] for r in rows] == answers
    assert rows[0]["messages"] == [{"role": "user", "content": "Hello there"}]
    # the second prompt holds the first exchange
    assert rows[1]["messages"] == [{"role": "user", "content": "Hello there"},
                                   {"role": "assistant", "content": answers[0]},
                                   {"role": "user", "content": "And you?"}]
    assert rows[2]["messages"] == [{"role": "user", "content": "Как дела?"}]  # after /reset


def test_outputs_are_replaced_whole_and_transcripts_appended(ckpt, no_eos, tmp_path, capsys, monkeypatch):
    out = tmp_path / "answers.jsonl"
    out.write_text("previous answers\n", encoding="utf-8")
    out.chmod(0o644)
    args = ["generate", "--model", ckpt, "--prompt", "Hello there", "--prompt", "Как дела?", "--sampler",
            no_eos, "--canvas_length", "4", "--output", str(out)]
    import contextlib

    from diffusion_lm.cli import generate as commands

    real_open = commands.open_output

    @contextlib.contextmanager
    def disk_full_after_one_row(path):
        with real_open(path) as handle:
            class Handle:
                rows = 0

                def write(self, text):
                    Handle.rows += 1
                    if Handle.rows == 2:
                        raise OSError(28, "No space left on device")
                    handle.write(text)

            yield Handle()

    monkeypatch.setattr(commands, "open_output", disk_full_after_one_row)
    with pytest.raises(OSError):
        main(args)
    monkeypatch.undo()
    assert out.read_text(encoding="utf-8") == "previous answers\n"  # not truncated, not half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    main(args)
    assert len(out.read_text(encoding="utf-8").splitlines()) == 2
    assert oct(out.stat().st_mode & 0o777) == "0o644"

    transcript = tmp_path / "chat.jsonl"
    transcript.write_text('{"turn": 1, "note": "an earlier session"}\n', encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    main(["chat", "--model", ckpt, "--sampler", no_eos, "--canvas_length", "4", "--transcript",
          str(transcript)])
    rows = [json.loads(line) for line in transcript.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"turn": 1, "note": "an earlier session"} and len(rows) == 2
    assert rows[1]["messages"] == [{"role": "user", "content": "Hello there"}]


def test_chat_session_prompt_ids_and_context_trimming(model):
    tpl = model.template
    session = ChatSession(model, build_sampler(sampler={"preset": "fast", "suppress_tokens": [tpl.eos_id]}),
                          canvas_length=8, system="Be brief.")
    first = session.ask("Hello there")
    second = session.ask("And you?")
    ids1, ids2 = tpl.prompt_ids(first.context), tpl.prompt_ids(second.context)
    assert ids2[:len(ids1)] == ids1  # the first prompt is a prefix of the second ...
    answer_ids = tpl.encode_text(first.answer) + [tpl.eos_id]
    assert ids2[len(ids1):len(ids1) + len(answer_ids)] == answer_ids  # ... followed by the first answer
    assert second.context[0].role == "system"
    # a long conversation drops its oldest exchanges instead of failing
    for k in range(12):
        reply = session.ask("tell me more about " + "things " * 6)
    assert reply.dropped >= 1 and reply.context[0].role == "system"
    assert len(tpl.prompt_ids(reply.context)) + 8 <= MAX_POSITIONS
    with pytest.raises(ConfigError, match="shorter message"):
        session.ask("word " * 200)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("command, extra, expected", [
    ("generate", ["--prompt", "word " * 150, "--canvas_length", "16"], "prompt 1 'word word"),
    ("generate", ["--prompt", "hi", "--canvas_length", "0"], "--canvas_length must be >= 1"),
    ("generate", ["--prompt", "hi", "--steps", "-2"], "--steps must be >= 1"),
    ("generate", ["--prompt", "hi", "--preset", "turbo"], "unknown sampler preset 'turbo'"),
    ("generate", ["--prompt", "hi", "--sampler", "{window: wide}"],
     "unknown window 'wide'; valid names: full, block"),
    ("generate", ["--prompt", "hi", "--sampler", "{proposer: {name: nucleus}}"],
     "unknown proposer 'nucleus'"),
    ("generate", [], "no prompts"),
    ("generate", ["--prompt", "  "], "--prompt number 1 is empty"),
    ("infill", ["--text", "a [[MASK b"], "unclosed '[['"),
    ("infill", ["--text", "a [[MASK:0]] b"], "invalid slot count '0'"),
    ("infill", ["--text", "a [[HOLE]] b"], "unknown span '[[HOLE]]'"),
    ("infill", ["--text", "no holes"], "has no hole to fill"),
    ("infill", ["--text", "a [[MASK:<=x]] b"], "invalid slot count 'x'"),
    ("chat", ["--canvas_length", "-1"], "--canvas_length must be >= 1"),
    ("sweep", ["--steps", "4,eight"], "--steps: 'eight' is not an integer"),
    ("sweep", ["--thresholds", "0"], "--threshold must be > 0"),
    ("sweep", ["--task", "quiz=x.jsonl"], "--task 'quiz=x.jsonl': expected KIND=PATH"),
    ("sweep", ["--task", "chat=missing.jsonl"], "no such file 'missing.jsonl'"),
    ("sweep", ["--steps", "", "--thresholds", "", "--block_sizes", "", "--repetition_guard", "false"],
     "nothing to sweep"),
])
def test_bad_inputs_are_one_line_errors(ckpt, capsys, command, extra, expected):
    line = _error([command, "--model", ckpt] + extra, capsys)
    assert expected in line


def test_sweep_command_writes_table_and_plots(ckpt, tmp_path, capsys):
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"language": "en", "prompt": "Hello there", "reference": "Hi! How can I help?"},
        {"language": "ru", "prompt": "Как дела?", "reference": "Хорошо, спасибо."}])
    fim = write_jsonl(tmp_path / "fim.jsonl", [{"prefix": "def f(a):\n    ", "middle": "b = a",
                                                "suffix": "\n    return b"}])
    out = tmp_path / "sweep"
    main(["sweep", "--model", ckpt, "--task", f"chat={chat}", "--task", f"fim={fim}", "--steps", "2,4",
          "--thresholds", "", "--block_sizes", "4", "--repetition_guard", "false", "--output_dir", str(out)])
    assert "report.md" in capsys.readouterr().err
    rows = json.loads((out / "report.json").read_text(encoding="utf-8"))["sweep"]
    assert {(r["factor"], r["value"], r["task"]) for r in rows} >= {
        ("steps", 2, "chat"), ("steps", 4, "fim"), ("block_size", 4, "chat[en]"),
        ("block_size", 4, "chat[ru]")}
    assert all(0.0 <= r["chrf"] <= 100.0 for r in rows if "chrf" in r)
    assert "| steps | 2 | chat |" in (out / "report.md").read_text(encoding="utf-8")
    assert (out / "sweep_steps.png").stat().st_size > 1000 and (out / "sweep_block_size.png").exists()


def test_prompt_too_long_names_prompt_lengths_and_fix(ckpt, capsys):
    line = _error(["generate", "--model", ckpt, "--prompt", "short", "--prompt", "word " * 150,
                   "--canvas_length", "16"], capsys)
    assert "prompt 2" in line and f"limit of {MAX_POSITIONS} positions" in line
    assert "--canvas_length" in line and "shorten the prompt" in line


def test_missing_model_and_empty_input(tmp_path, capsys):
    line = _error(["generate", "--model", str(tmp_path / "nope.ckpt"), "--prompt", "hi"], capsys)
    assert "nope.ckpt" in line and "no such checkpoint file or export folder" in line
    line = _error(["chat", "--model", str(tmp_path / "missing")], capsys)
    assert "no such checkpoint" in line
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert "holds no prompts" in _error(["generate", "--model", "x.ckpt", "--input", str(empty)], capsys)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n', encoding="utf-8")
    assert "line 1" in _error(["generate", "--model", "x.ckpt", "--input", str(bad)], capsys)
    assert "no such file" in _error(["generate", "--model", "x.ckpt", "--input",
                                     str(tmp_path / "none.jsonl")], capsys)
    empty_text = tmp_path / "empty.txt"
    empty_text.write_text("  \n", encoding="utf-8")
    assert "is empty" in _error(["infill", "--model", "x.ckpt", "--input", str(empty_text)], capsys)
    assert "--steps (fixed" in _error(["generate", "--model", "x.ckpt", "--prompt", "hi", "--steps", "4",
                                       "--threshold", "0.8"], capsys)


def test_generate_from_export_folder_matches_checkpoint(ckpt, tmp_path, capsys):
    from diffusion_lm.export import export_checkpoint

    folder = export_checkpoint(ckpt, tmp_path / "export", verify=False)
    args = ["--prompt", "Hello there", "--preset", "greedy", "--canvas_length", "6", "--output"]
    main(["generate", "--model", ckpt] + args + [str(tmp_path / "a.jsonl")])
    main(["generate", "--model", str(folder)] + args + [str(tmp_path / "b.jsonl")])
    a, b = (json.loads((tmp_path / f).read_text(encoding="utf-8")) for f in ("a.jsonl", "b.jsonl"))
    assert a["answer"] == b["answer"] and a["stats"]["nfe"] == b["stats"]["nfe"]


def test_bench_sample_smoke(ckpt, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_sample", REPO / "tools" / "bench_sample.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--model", ckpt, "--prompt-tokens", "12", "--canvas", "6", "--repeats", "1",
                         "--prompts", "2", "--batch-sizes", "1", "3", "--threads", "1",
                         "--variants", "naive", "fast", "greedy-plain", "gpt2"])
    block = report["results"]["batch_3"]
    naive, fast, gpt2 = block["naive"], block["fast"], block["gpt2"]
    assert naive["forwards_per_answer"] == 6 and naive["tokens_per_forward"] == 1.0
    assert 1 <= fast["forwards_per_answer"] <= 6 and fast["tokens_per_forward"] >= 1
    assert gpt2["mean_answer_tokens"] == 6 and gpt2["speedup_vs_gpt2"] == 1.0
    assert report["prompt_tokens"] == 12 and 0.5 < report["gpt2_parameters"] / report["parameters"] < 2
    assert json.loads(capsys.readouterr().out)["canvas_length"] == 6
