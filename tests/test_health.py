"""The MLM health check tells a trained masked LM from a random or fresh head, runs at fit start
(logged, warned, switchable), and is available as ``diffusion-lm check``."""

from __future__ import annotations

import csv
import itertools
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger

from diffusion_lm import DataSource, DialogDataModule, MaskedDiffusionLM
from diffusion_lm.backbone import SparseHeadDenoiser, load_backbone
from diffusion_lm.cli import main
from diffusion_lm.data import CanvasPolicy, ChatTemplate
from diffusion_lm.health import MLMHealthCheck, MLMHealthError, MLMHealthWarning, mlm_health
from diffusion_lm.objective import apply_noise

from .conftest import write_jsonl
from .families import make_family

# Each prompt has exactly one answer, repeated: a tiny MLM learns it in a few seconds.
REPETITIVE = [
    {"messages": [{"role": "user", "content": "Count to ten."},
                  {"role": "assistant", "content": "one two three four five six seven eight nine ten"}]},
    {"messages": [{"role": "user", "content": "Посчитай до пяти."},
                  {"role": "assistant", "content": "один два три четыре пять"}]},
    {"messages": [{"role": "user", "content": "Hello there"},
                  {"role": "assistant", "content": "Hi! How can I help? Hi! How can I help?"}]},
] * 8


def _data(path: Path, batch_size: int = 8) -> DialogDataModule:
    return DialogDataModule([DataSource(str(path), format="messages", language="en", val_size=0)],
                            batch_size=batch_size, max_length=96, canvas=CanvasPolicy(mode="none", length=48))


def _batches(folder: Path, data_file: Path):
    model, tokenizer = load_backbone(str(folder))
    template = ChatTemplate(tokenizer)
    data = _data(data_file)
    data.template = template
    data.setup("fit")
    return model, tokenizer, template, list(data.train_dataloader())


def _check(model, tokenizer, template, batches, **kwargs):
    net = SparseHeadDenoiser(model, template.mask_id).eval()
    ignore = [template.pad_id, template.eos_id, template.bos_id]
    return mlm_health(net, batches, mask_id=template.mask_id, vocab_size=len(tokenizer), ignore_ids=ignore,
                      **kwargs)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "repetitive.jsonl", REPETITIVE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, data_file) -> dict[str, Path]:
    """``random``: a tiny BERT as initialised; ``trained``: the same model after quick MLM training."""
    root = tmp_path_factory.mktemp("health")
    random_folder = make_family("bert", root / "random")
    model, tokenizer, template, batches = _batches(random_folder, data_file)
    net = SparseHeadDenoiser(model, template.mask_id).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(150):
        b = batches[step % len(batches)]
        rate = 0.1 + 0.4 * torch.rand(b["input_ids"].shape[0], generator=gen)
        noised, masked = apply_noise(b["input_ids"], b["loss_mask"], rate, template.mask_id, generator=gen)
        loss = F.cross_entropy(net(noised, b["attention_mask"], masked), b["input_ids"][masked])
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained_folder = root / "trained"
    model.save_pretrained(trained_folder)
    tokenizer.save_pretrained(trained_folder)
    return {"random": random_folder, "trained": trained_folder}


def test_health_check_separates_a_trained_mlm_from_a_random_head(folders, data_file):
    trained = _check(*_batches(folders["trained"], data_file))
    random = _check(*_batches(folders["random"], data_file))
    assert trained.verdict == "healthy", trained.table()
    assert random.verdict == "no_mlm", random.table()
    assert [r.rate for r in trained.results] == [0.15, 0.5, 0.9]
    # A random head is right by chance only (a few tokens of this ~70-token sample; the count moves
    # with the tiny tokenizer's training, which is not bit-stable across machines).
    assert trained.results[0].accuracy > 0.4 > 0.2 > random.results[0].accuracy
    assert trained.results[0].nll < trained.unigram_nll - 1.0 < random.results[0].nll
    # A random head sits near the uniform NLL log V; the sample's own frequencies do better.
    assert random.results[0].nll == pytest.approx(random.uniform_nll, abs=1.0)
    assert "no usable masked-LM ability" in random.message and "FRIDA" in random.message


def test_fresh_t5_head_is_flagged(tmp_path, data_file):
    report = _check(*_batches(make_family("t5", tmp_path / "t5"), data_file))
    assert report.verdict == "no_mlm"


def test_same_seed_same_figures_and_chunking_does_not_change_them(folders, data_file):
    model, tokenizer, template, batches = _batches(folders["trained"], data_file)
    first = _check(model, tokenizer, template, batches)
    assert _check(model, tokenizer, template, batches) == first
    # Scoring a few rows per call (bounded [N, V] logits for a 256k vocabulary) gives the same figures.
    chunked = _check(model, tokenizer, template, batches, max_scored_per_call=5)
    for a, b in zip(first.results, chunked.results):
        assert a.tokens == b.tokens and a.accuracy == pytest.approx(b.accuracy)
        assert a.nll == pytest.approx(b.nll, rel=1e-5)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                    limit_val_batches=0, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kw})


def test_fit_runs_the_check_logs_it_and_warns(folders, data_file, tmp_path):
    model = MaskedDiffusionLM(str(folders["random"]), warmup_steps=0)
    trainer = _trainer(tmp_path, logger=CSVLogger(tmp_path, name="logs"))
    with pytest.warns(MLMHealthWarning, match="no_mlm"):
        trainer.fit(model, _data(data_file))
    checks = [cb for cb in trainer.callbacks if isinstance(cb, MLMHealthCheck)]
    assert len(checks) == 1 and checks[0].report.verdict == "no_mlm"
    rows = list(csv.DictReader(open(next(Path(tmp_path, "logs").rglob("metrics.csv")))))
    logged = {k: v for row in rows for k, v in row.items() if k.startswith("mlm_check/") and v}
    assert {"mlm_check/acc_mask15", "mlm_check/nll_mask90", "mlm_check/unigram_nll"} <= set(logged)
    assert float(logged["mlm_check/healthy"]) == 0.0


def test_healthy_backbone_passes_quietly(folders, data_file, tmp_path):
    model = MaskedDiffusionLM(str(folders["trained"]), warmup_steps=0)
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MLMHealthWarning)
        trainer.fit(model, _data(data_file))
    check = next(cb for cb in trainer.callbacks if isinstance(cb, MLMHealthCheck))
    assert check.report.healthy


def test_check_can_be_switched_off_or_configured(folders, data_file, tmp_path):
    model = MaskedDiffusionLM(str(folders["random"]), warmup_steps=0, health_check=False)
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MLMHealthWarning)
        trainer.fit(model, _data(data_file))
    assert not any(isinstance(cb, MLMHealthCheck) for cb in trainer.callbacks)

    # A user-configured check replaces the default one; on_failure="raise" stops the run before step 1.
    model = MaskedDiffusionLM(str(folders["random"]), warmup_steps=0)
    strict = MLMHealthCheck(num_batches=1, on_failure="raise")
    trainer = _trainer(tmp_path, callbacks=[strict])
    with pytest.raises(MLMHealthError, match="no usable masked-LM ability"), pytest.warns(MLMHealthWarning):
        trainer.fit(model, _data(data_file))
    assert [cb for cb in trainer.callbacks if isinstance(cb, MLMHealthCheck)] == [strict]
    assert trainer.global_step == 0


def test_models_built_from_a_config_get_no_automatic_check(data_file, tmp_path):
    # A scratch model's head is random by construction: the default check would only warn about that.
    from diffusion_lm import ScratchBackbone

    from .conftest import TINY

    model = MaskedDiffusionLM(ScratchBackbone(**TINY), warmup_steps=0)
    trainer = _trainer(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MLMHealthWarning)
        trainer.fit(model, _data(data_file))
    assert not any(isinstance(cb, MLMHealthCheck) for cb in trainer.callbacks)


def test_cli_models_built_from_a_config_get_no_automatic_check(data_file, tmp_path, monkeypatch):
    # Through LightningCLI the from-scratch backbone reaches hparams as a plain dict, not a ScratchBackbone.
    from .conftest import tiny_cli_args

    ran = []
    monkeypatch.setattr(MLMHealthCheck, "on_fit_start", lambda self, trainer, module: ran.append(module))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MLMHealthWarning)
        main(["fit"] + tiny_cli_args(tmp_path, data_file, "--trainer.max_steps=1"))
    assert ran == []


def test_check_is_skipped_when_resuming(folders, data_file, tmp_path):
    model = MaskedDiffusionLM(str(folders["trained"]), warmup_steps=0, health_check=False)
    _trainer(tmp_path, enable_checkpointing=True).fit(model, _data(data_file))
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    check = MLMHealthCheck()
    _trainer(tmp_path, max_steps=2, callbacks=[check]).fit(model, _data(data_file), ckpt_path=str(ckpt))
    assert check.report is None


def test_check_command(folders, data_file, capsys):
    sources = f"[{{path: {data_file}, format: messages, language: en}}]"
    main(["check", "--model", str(folders["trained"]), "--sources", sources, "--canvas_length", "48",
          "--max_length", "96", "--num_batches", "2"])
    out = capsys.readouterr().out
    assert "verdict: healthy" in out and "0.15" in out and "0.90" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--model", str(folders["random"]), "--sources", sources, "--canvas_length", "48",
              "--max_length", "96", "--num_batches", "2", "--fail", "true"])
    assert exit_info.value.code == 1
    assert "verdict: no_mlm" in capsys.readouterr().out


def test_check_command_reads_a_recipe(folders, data_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model:\n  backbone: {folders['trained']}\n"
        f"data:\n  sources:\n    - {{path: {data_file}, format: messages, language: en}}\n"
        "  max_length: 96\n  canvas: {length: 48}\n",
        encoding="utf-8",
    )
    main(["check", "--recipe", str(recipe), "--num_batches", "1"])
    assert "verdict: healthy" in capsys.readouterr().out


def test_report_table_and_metrics_are_complete(folders, data_file):
    report = _check(*_batches(folders["trained"], data_file))
    metrics = report.metrics()
    assert set(metrics) == {f"mlm_check/{k}_mask{r}" for k in ("acc", "nll") for r in (15, 50, 90)} | {
        "mlm_check/unigram_nll", "mlm_check/uniform_nll", "mlm_check/healthy"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert "verdict: healthy" in report.table()
    assert sum(r.tokens for r in itertools.islice(report.results, 1)) > 20


def test_a_trained_model_answers_the_same_batched_and_one_by_one(folders):
    """Batch padding changes the float rounding of a real encoder's kernels, so only agreement is
    expected, and only where the model is sure (docs/sampling.md); this quickly trained MLM (the
    fixture above) is sure of its memorised answers, unlike a freshly initialised model."""
    from diffusion_lm.sampling import SamplerConfig

    model = MaskedDiffusionLM(str(folders["trained"]), health_check=False).eval()
    prompts = [r["messages"][0]["content"] for r in REPETITIVE[:3]]
    greedy = SamplerConfig.preset("greedy", window="full")
    batched = model.generate(prompts, sampler=greedy, canvas_length=12)
    single = [model.generate([p], sampler=greedy, canvas_length=12).texts[0] for p in prompts]
    assert batched.texts == single
