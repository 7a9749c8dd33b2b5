"""``bittern.train`` end to end on CPU with tiny settings (from scratch, conversion, continued training, chat SFT
through TRL), plus the pieces that decide a run: config validation, the distillation loss and the weight-decay
callback. SIGKILL resume and DDP/FSDP2 are covered in test_resume.py and test_distributed.py."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch

import bittern
from bittern.errors import ConfigError
from bittern.train import TrainConfig, train
from bittern.train.callbacks import WeightDecaySchedule, read_metrics
from bittern.train.corpus import pydoc_topics
from bittern.train.run import RUN_CONFIG, VARIANTS
from bittern.train.schedules import lr_multiplier
from bittern.train.tokenizer import load_tokenizer, train_bpe_tokenizer
from bittern.train.trainer import distillation_kl

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|endoftext|>{% endfor %}"

#: tiny, fast settings shared by every run below
TINY = dict(preset="tiny", num_layers=1, vocab_size=300, seq_len=32, batch_size=4, progress=False, eval_tokens=2048)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory, text_dir: Path):
    """A finished from-scratch run with export: ``(config, result)``."""
    out = tmp_path_factory.mktemp("scratch") / "run"
    config = TrainConfig(
        out=str(out), data=[str(text_dir)], steps=30, lr=1e-2, log_every=3, eval_every=15, export=True, **TINY
    )
    return config, train(config)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _lambdas(run: Path) -> dict[int, float]:
    return {r["step"]: r["lambda"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def _held_out_tokens(run: Path) -> list[int]:
    """The held-out document of ``text_dir`` (every 20th from the 10th: only the 10th of 24), tokenized."""
    tokenizer = load_tokenizer(run / "tokenizer")
    return tokenizer(pydoc_topics()[10], add_special_tokens=False)["input_ids"]


# -- configuration ----------------------------------------------------------------------------------------


def test_a_sound_configuration_validates() -> None:
    TrainConfig(out="run", preset="tiny").validate()
    TrainConfig(out="run", model="some/dir", distill_weight=1.0, lambda_schedule="sigmoid").validate()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"steps": 0}, "--steps must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
        ({"schedule": "linear"}, "unknown --schedule 'linear'"),
        ({"lambda_schedule": "cosine"}, "unknown --lambda-schedule 'cosine'"),
        ({"preset": None}, "exactly one of --preset .* or --model"),
        ({"model": "some/dir"}, "exactly one of --preset .* or --model"),
        ({"preset": "huge"}, "unknown preset 'huge'"),
        ({"distill_weight": 0.5}, "--distill-weight needs a full-precision --model"),
        ({"eval_fraction": 0.0}, "--eval-fraction"),
        ({"eval_fraction": 0.5}, "--eval-fraction"),
        ({"eval_fraction": 1.5}, "--eval-fraction"),
        ({"seq_len": 1}, "--seq-len must be at least 2"),
        ({"lr": 0.0}, "--lr must be positive"),
        ({"warmup_steps": 1000}, "--warmup-steps"),
        ({"lambda_warmup_steps": 1001}, "--lambda-warmup-steps"),
        ({"decay_fraction": 1.5}, "--decay-fraction"),
        ({"distill_temperature": 0.0}, "--distill-temperature"),
        ({"gguf_file": "model.gguf"}, "--gguf-file"),
        ({"eval_every": 0}, "--eval-every"),
        ({"num_layers": 0}, "--num-layers"),
        ({"loss_chunk": -1}, "--loss-chunk must be >= 0"),
        ({"loss_chunk": 64, "fsdp": True}, "--loss-chunk does not support --fsdp"),
        ({"loss_chunk": 64, "preset": None, "model": "some/dir", "distill_weight": 1.0}, "--loss-chunk cannot be"),
    ],
)
def test_each_bad_setting_is_refused_naming_the_option(settings: dict, message: str) -> None:
    config = TrainConfig(**{"out": "run", "preset": "tiny", "steps": 1000, **settings})
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_differences_ignore_resume_neutral_settings() -> None:
    config = TrainConfig(out="a", preset="tiny", data=["x", "y"])
    stored = json.loads(json.dumps(config.as_dict()))  # as run_config.json stores it
    neutral = TrainConfig(
        out="b", preset="tiny", data=["x", "y"], progress=False, export=False, eval_every=7, save_every=3, log_every=1
    )
    assert neutral.differences(stored) == []
    changed = TrainConfig(out="a", preset="tiny", data=["x", "y"], lr=2e-3, seq_len=64)
    assert changed.differences(stored) == ["seq_len: 256 → 64", "lr: 0.0015 → 0.002"]
    assert TrainConfig(out="a", preset="tiny", data=["x"]).differences(stored) == ["data: ['x', 'y'] → ['x']"]


def test_a_run_stored_before_loss_chunk_existed_resumes_with_any_chunk() -> None:
    stored = TrainConfig(out="a", preset="tiny").as_dict()
    del stored["loss_chunk"]  # run_config.json of an older bittern
    assert TrainConfig(out="a", preset="tiny", loss_chunk=256).differences(stored) == []


# -- distillation and the weight-decay callback -------------------------------------------------------------


def _kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over rows of T² · Σ p_t (log p_t − log p_s)."""
    log_s = torch.log_softmax(student.double() / temperature, -1)
    log_t = torch.log_softmax(teacher.double() / temperature, -1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def test_distillation_kl_is_zero_for_identical_logits_and_matches_a_hand_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 6, 11, generator=generator)
    student = torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    assert float(distillation_kl(teacher.clone(), teacher, labels, 1.0)) == pytest.approx(0.0, abs=1e-6)
    for temperature in (1.0, 2.0):
        value = distillation_kl(student, teacher, labels, temperature)
        expected = _kl_by_hand(student[:, :-1].reshape(-1, 11), teacher[:, :-1].reshape(-1, 11), temperature)
        assert value.dtype == torch.float32
        assert float(value) > 0
        assert float(value) == pytest.approx(float(expected), rel=1e-5)


def test_distillation_kl_ignores_positions_whose_next_label_is_masked() -> None:
    generator = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 6, 11, generator=generator)
    student = torch.randn(2, 6, 11, generator=generator)
    labels = torch.randint(0, 11, (2, 6), generator=generator)
    labels[0, 3] = -100  # position 2 of row 0 predicts it: not counted
    labels[1, :3] = -100  # positions 0 and 1 of row 1 (position -1 predicts labels[1, 0], which is never counted)
    base = float(distillation_kl(student, teacher, labels, 1.0))
    kept = [(0, 0), (0, 1), (0, 3), (0, 4), (1, 2), (1, 3), (1, 4)]
    rows = torch.stack([student[b, i] for b, i in kept]), torch.stack([teacher[b, i] for b, i in kept])
    assert base == pytest.approx(float(_kl_by_hand(*rows, 1.0)), rel=1e-5)
    for ignored in [(0, 2), (1, 0), (1, 1), (0, 5), (1, 5)]:  # masked next label, or the last position
        changed = student.clone()
        changed[ignored] += 5.0 * torch.randn(11, generator=generator)
        assert float(distillation_kl(changed, teacher, labels, 1.0)) == pytest.approx(base, rel=1e-6), ignored
    changed = student.clone()
    changed[0, 3] += 5.0 * torch.randn(11, generator=generator)
    assert float(distillation_kl(changed, teacher, labels, 1.0)) != pytest.approx(base, rel=1e-3)
    # nothing to predict: zero, and still differentiable
    student.requires_grad_(True)
    nothing = distillation_kl(student, teacher, torch.full_like(labels, -100), 1.0)
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and torch.count_nonzero(student.grad) == 0


def test_weight_decay_callback_turns_decay_off_in_stage_two_for_decayed_groups_only() -> None:
    from transformers import TrainerState

    decayed, plain = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": 0.1}, {"params": [plain], "weight_decay": 0.0}], lr=1e-3
    )
    callback = WeightDecaySchedule("two-stage", peak=0.1, warmup_steps=2)
    seen = []
    for step in range(22):  # midpoint of the 20 post-warmup steps: step 12
        callback.on_step_begin(None, TrainerState(global_step=step, max_steps=22), None, optimizer=optimizer)
        seen.append((optimizer.param_groups[0]["weight_decay"], optimizer.param_groups[1]["weight_decay"]))
    assert seen == [(0.1, 0.0)] * 12 + [(0.0, 0.0)] * 10
    wsd = WeightDecaySchedule("wsd", peak=0.1, warmup_steps=2)
    wsd.on_step_begin(None, TrainerState(global_step=21, max_steps=22), None, optimizer=optimizer)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1, "a group once decayed is still recognized"
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


# -- end to end ---------------------------------------------------------------------------------------------


def test_from_scratch_trains_exports_reports_and_the_packed_variant_matches(scratch) -> None:
    config, result = scratch
    run = Path(config.out)
    assert result.mode == "scratch" and "mode: scratch" in result.notes
    assert json.loads((run / RUN_CONFIG).read_text()) == config.as_dict()

    records = read_metrics(run / "metrics.jsonl")
    losses = _losses(run)
    assert sorted(losses) == list(range(3, 31, 3)), "a loss record for every logged step"
    assert all(math.isfinite(v) for v in losses.values())
    assert set(_lambdas(run).values()) == {1.0}, "from scratch trains ternary from the first step"
    for record in records:  # the Trainer follows bittern's schedule: the rate used for step k is multiplier(k - 1)
        if "loss" in record:
            expected = config.lr * lr_multiplier("wsd", record["step"] - 1, 30, config.warmup, config.decay_fraction)
            assert record["learning_rate"] == pytest.approx(expected, rel=1e-6), record
    held = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held] == [15, 30] and all(math.isfinite(r["eval_loss"]) for r in held)
    # the first record is the mean over steps 1-3 (from about ln 300 = 5.7); the run ends near 4.6
    assert sum(losses[s] for s in (24, 27, 30)) / 3 < losses[3] - 0.5, losses

    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    assert [v.variant for v in result.variants] == list(VARIANTS)
    report = (run / "report.md").read_text(encoding="utf-8")
    for variant in result.variants:
        assert (run / "variants" / variant.variant / "config.json").is_file()
        assert (run / "variants" / variant.variant / "tokenizer.json").is_file()
        row = re.search(rf"^\| {variant.variant} \(`variants/{variant.variant}`\) \|.*\| ([0-9.]+) \|$", report, re.M)
        assert row, f"report.md lacks the {variant.variant} row"
        assert math.isfinite(float(row.group(1))) and float(row.group(1)) == pytest.approx(variant.perplexity, abs=0.01)
        assert variant.perplexity < 300, "a trained model beats the uniform distribution over its vocabulary"
    sizes = {v.variant: v.size_bytes for v in result.variants}
    assert sizes["packed"] < sizes["bf16"] < sizes["prequantized"]
    assert f"| {result.unigram_perplexity:.2f} |" in report

    packed = bittern.load_model(run / "variants" / "packed").eval()
    prequantized = bittern.load_model(run / "variants" / "prequantized").eval()
    assert isinstance(packed.model.layers[0].mlp.down_proj, bittern.TernaryLinear), "packed: the integer path"
    assert isinstance(prequantized.model.layers[0].mlp.down_proj, bittern.BitLinear), "prequantized: latent weights"
    tokens = torch.tensor(_held_out_tokens(run)[:64]).view(2, 32)
    with torch.no_grad():
        reference = prequantized(tokens).logits.float()
        logits = packed(tokens).logits.float()
    assert float((logits - reference).norm() / reference.norm()) < 2e-2


def test_continue_mode_trains_the_prequantized_variant_with_lambda_one(scratch, text_dir: Path, tmp_path: Path) -> None:
    scratch_config, _ = scratch
    source = Path(scratch_config.out) / "variants" / "prequantized"
    config = TrainConfig(
        out=str(tmp_path / "continued"),
        model=str(source),
        data=[str(text_dir)],
        seq_len=32,
        batch_size=4,
        steps=4,
        lr=1e-3,
        log_every=1,
        export=False,
        progress=False,
    )
    result = train(config)
    assert result.mode == "continue" and "mode: continue" in result.notes
    assert not any("λ warmup" in note for note in result.notes)
    assert _lambdas(Path(config.out)) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    losses = _losses(Path(config.out))
    # the trained weights were loaded: the first loss is far below the untrained model's
    assert losses[1] < _losses(Path(scratch_config.out))[3] - 0.3, losses


@pytest.fixture(scope="module")
def full_precision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny plain (float32) Llama and a locally trained tokenizer of the same vocabulary, side by side."""
    directory = tmp_path_factory.mktemp("llama")
    tokenizer = train_bpe_tokenizer(pydoc_topics()[:12], 300)
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _convert(out: Path, source: Path, text_dir: Path, distill_weight: float):
    config = TrainConfig(
        out=str(out),
        model=str(source),
        data=[str(text_dir)],
        seq_len=32,
        batch_size=2,
        steps=6,
        lr=1e-3,
        lambda_schedule="linear",
        lambda_warmup_steps=4,
        distill_weight=distill_weight,
        log_every=1,
        export=False,
        progress=False,
    )
    return config, train(config)


def test_convert_mode_warms_lambda_up_to_exactly_one_and_distills(
    full_precision_dir: Path, text_dir: Path, tmp_path: Path
) -> None:
    config, result = _convert(tmp_path / "distilled", full_precision_dir, text_dir, distill_weight=1.0)
    run = Path(config.out)
    assert result.mode == "convert" and "mode: convert" in result.notes
    assert "λ warmup: linear over 4 steps" in result.notes
    assert any("distillation from the frozen original" in note for note in result.notes)
    lambdas = _lambdas(run)
    assert lambdas == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 5: 1.0, 6: 1.0}
    assert lambdas[4] == 1.0  # exactly: the layers take the integer path from here on

    # the same run without a teacher: identical first forward pass, so the difference is the KL term (> 0)
    _, plain = _convert(tmp_path / "plain", full_precision_dir, text_dir, distill_weight=0.0)
    assert "mode: convert" in plain.notes and not any("distillation" in note for note in plain.notes)
    distilled_loss, plain_loss = _losses(run)[1], _losses(tmp_path / "plain")[1]
    assert 0.005 < distilled_loss - plain_loss < 1.0, "a small, positive KL to the original at λ = 0.25"
    # the two terms are logged apart: loss = ce + weight * kl
    first = next(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    assert first["ce"] + first["kl"] == pytest.approx(first["loss"], rel=1e-5)
    assert first["ce"] == pytest.approx(plain_loss, rel=1e-5)


def _conversations(count: int) -> list[dict]:
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "with", "one", "red", "dog", "and", "two", "blue", "birds"]
    records = []
    for _ in range(count):
        phrase = " ".join(rng.choice(words) for _ in range(4))
        records.append(
            {"messages": [{"role": "user", "content": f"repeat: {phrase}"}, {"role": "assistant", "content": phrase}]}
        )
    return records


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("chat")
    data = directory / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _conversations(40)), encoding="utf-8")
    tokenizer = train_bpe_tokenizer(pydoc_topics()[:8], 300)
    tokenizer.save_pretrained(directory / "plain_tokenizer")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory / "chat_tokenizer")
    return {"data": data, "chat": directory / "chat_tokenizer", "plain": directory / "plain_tokenizer"}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # raised inside TRL
def test_chat_data_fine_tunes_through_trl(chat_files: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("trl")
    out = tmp_path / "sft"
    settings = {**TINY, "batch_size": 4}
    config = TrainConfig(
        out=str(out),
        data=[str(chat_files["data"])],
        tokenizer=str(chat_files["chat"]),
        steps=6,
        lr=3e-3,
        log_every=1,
        export=False,
        **settings,
    )
    result = train(config)
    assert result.mode == "scratch"
    assert any("every 20th conversation held out (2 of 40)" in note for note in result.notes)
    losses = _losses(out)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(math.isfinite(v) for v in losses.values())
    assert losses[6] < losses[1], losses
    assert any("eval_loss" in r for r in read_metrics(out / "metrics.jsonl"))
    assert (out / "tokenizer" / "chat_template.jinja").is_file() or "chat_template" in (
        out / "tokenizer" / "tokenizer_config.json"
    ).read_text(encoding="utf-8")


def test_chunked_loss_trains_like_transformers_loss(text_dir: Path, tmp_path: Path) -> None:
    """--loss-chunk: the same training and held-out losses, with gradient accumulation (the summed loss divided by
    the accumulated batch's token count) and 32-token sequences in chunks of 24 (chunks straddle sequences)."""
    losses, held_out = {}, {}
    for chunk in (0, 24):
        out = tmp_path / f"chunk{chunk}"
        config = TrainConfig(out=str(out), data=[str(text_dir)], steps=6, grad_accum=2, lr=3e-3, log_every=1,
                             eval_every=3, export=False, loss_chunk=chunk, **TINY)  # fmt: skip
        train(config)
        losses[chunk] = _losses(out)
        held_out[chunk] = [r["eval_loss"] for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert sorted(losses[24]) == [1, 2, 3, 4, 5, 6] and len(held_out[24]) == 2
    # the first step is the same model on the same batch; later steps may flip a ternary code on rounding noise
    assert losses[24][1] == pytest.approx(losses[0][1], rel=1e-5)
    assert losses[24] == pytest.approx(losses[0], rel=1e-3)
    assert held_out[24] == pytest.approx(held_out[0], rel=1e-3)


def test_chunked_loss_runs_the_head_under_the_trainers_autocast(tmp_path: Path) -> None:
    """bf16 mixed precision (accelerate's autocast, on the CPU here): every chunk's head product is a bf16 one,
    as the full head's is without chunks, and the losses agree."""
    from transformers import TrainingArguments

    from bittern.train.trainer import TernaryTrainer

    ids = token_batch(batch=8, length=33)
    data = [{"input_ids": row, "labels": row} for row in ids]
    losses, heads = {}, {}
    for chunk in (0, 24):
        model = bittern.to_bitlinear(tiny_model("bitnet", tie_word_embeddings=True)).train()
        args = TrainingArguments(output_dir=str(tmp_path / str(chunk)), max_steps=2, per_device_train_batch_size=4,
                                 logging_steps=1, report_to="none", use_cpu=True, bf16=True, save_strategy="no",
                                 disable_tqdm=True)  # fmt: skip
        trainer = TernaryTrainer(model=model, args=args, train_dataset=data, loss_chunk=chunk)
        seen: set = set()
        hook = model.lm_head.register_forward_hook(lambda m, a, out, seen=seen: seen.add((out.shape[0], out.dtype)))
        trainer.train()
        hook.remove()
        losses[chunk] = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        heads[chunk] = seen
    assert heads[0] == {(4, torch.bfloat16)}  # [4, 33, 256] logits at once
    assert heads[24] == {(4, torch.bfloat16), (24, torch.bfloat16), (12, torch.bfloat16)}  # [4, 1, 256], chunks
    assert len(losses[24]) == 2 and losses[24] == pytest.approx(losses[0], rel=1e-3)


def test_chunked_loss_is_refused_for_chat_data(chat_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "sft"
    config = TrainConfig(out=str(out), data=[str(chat_files["data"])], tokenizer=str(chat_files["chat"]), steps=2,
                         loss_chunk=64, **TINY)  # fmt: skip
    with pytest.raises(ConfigError, match="--loss-chunk applies to text data"):
        train(config)
    assert not (out / RUN_CONFIG).exists(), "a refused command leaves no run behind"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # raised inside TRL
def test_chat_data_without_a_chat_template_gets_the_plain_default(chat_files: dict[str, Path], tmp_path: Path) -> None:
    """From scratch on chat data: bittern's own tokenizer has no template, so the run gives it ``plain``, which
    every exported variant carries (``bittern chat`` then works on them)."""
    pytest.importorskip("trl")
    from bittern.tokenization import CHAT_TEMPLATES

    out = tmp_path / "sft"
    result = train(TrainConfig(out=str(out), data=[str(chat_files["data"])], steps=2, log_every=1, **TINY))
    assert load_tokenizer(out / "tokenizer").chat_template == CHAT_TEMPLATES["plain"]
    assert any(note.startswith("chat template: plain (the default for chat data") for note in result.notes)
    for variant in VARIANTS:
        assert load_tokenizer(out / "variants" / variant).chat_template == CHAT_TEMPLATES["plain"]
    engine = bittern.load(out / "variants" / "packed")
    reply = engine.chat([{"role": "user", "content": "Hi"}], 4)
    assert len(reply.token_ids[0]) >= 1


def test_chat_template_option_is_stored_with_the_runs_tokenizer(text_dir: Path, tmp_path: Path) -> None:
    from bittern.tokenization import CHAT_TEMPLATES

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}", encoding="utf-8")
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), data=[str(text_dir)], steps=1, export=False, chat_template=str(template), **TINY))
    assert load_tokenizer(out / "tokenizer").chat_template == template.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="--chat-template 'chatm' is neither a template name"):
        train(TrainConfig(out=str(tmp_path / "bad"), data=[str(text_dir)], chat_template="chatm", **TINY))
    assert not (tmp_path / "bad").exists()
    assert "plain" in CHAT_TEMPLATES


def test_checkpoints_and_variants_get_the_umasks_permissions(scratch) -> None:
    from bittern.formats.common import current_umask

    config, _ = scratch
    run = Path(config.out)
    mask = current_umask()
    files = [*(run / "checkpoints").rglob("*.safetensors"), *(run / "variants").rglob("*.safetensors")]
    assert len(files) >= 5
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~mask)}
    directories = [p for p in (run / "variants").iterdir()] + [p for p in (run / "checkpoints").iterdir()]
    assert {oct(p.stat().st_mode & 0o777) for p in directories} == {oct(0o777 & ~mask)}


# -- errors before any training -----------------------------------------------------------------------------


def test_an_unknown_preset_is_refused_before_the_run_directory_is_made(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        train(TrainConfig(out=str(out), data=[str(text_dir)], **{**TINY, "preset": "huge"}))
    assert not out.exists()


def test_a_missing_tokenizer_directory_is_refused(text_dir: Path, tmp_path: Path) -> None:
    out, missing = tmp_path / "run", tmp_path / "no_such_tokenizer"
    with pytest.raises(ConfigError, match=r"--tokenizer .*no_such_tokenizer: not a directory"):
        train(TrainConfig(out=str(out), data=[str(text_dir)], tokenizer=str(missing), steps=2, **TINY))
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    assert not (out / RUN_CONFIG).exists(), "a refused command leaves no run behind"


def test_a_seq_len_beyond_the_model_is_refused_and_the_corrected_command_then_runs(
    text_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    too_long = TrainConfig(out=str(out), data=[str(text_dir)], steps=2, export=False, **{**TINY, "seq_len": 2048})
    with pytest.raises(ConfigError, match="--seq-len 2048 exceeds the model's maximum of 1024 positions"):
        train(too_long)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # the refused command must not leave a run behind that blocks the corrected one
    fixed = TrainConfig(out=str(out), data=[str(text_dir)], steps=2, log_every=1, export=False, **TINY)
    train(fixed)
    assert sorted(_losses(out)) == [1, 2]


def test_a_missing_or_empty_model_directory_is_named_as_model(text_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty_model"
    empty.mkdir()
    options = dict(data=[str(text_dir)], steps=2, seq_len=32, progress=False)
    with pytest.raises(ConfigError, match=r"^--model .*no_such_model: not a directory \(it does not exist\)$"):
        train(TrainConfig(out=str(tmp_path / "run"), model=str(tmp_path / "no_such_model"), **options))
    with pytest.raises(ConfigError) as error:
        train(TrainConfig(out=str(tmp_path / "run"), model=str(empty), **options))
    assert str(error.value) == (
        f"--model {empty}: not a checkpoint directory (it holds no config.json and no tokenizer files)"
    )
    (empty / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^--model .*empty_model: no usable tokenizer files .*--tokenizer DIR$"):
        train(TrainConfig(out=str(tmp_path / "run"), model=str(empty), **options))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "no_such_model"}, "--model no_such_model: not a directory"),
        ({"model": "empty_model"}, "not a checkpoint directory"),
        ({"data": ["no_such_file.txt"]}, "no_such_file.txt"),
        ({"vocab_size": 10}, "--vocab-size must be at least 300"),
    ],
)
def test_a_run_refused_before_training_leaves_no_new_output_directory(
    text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: dict, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("empty_model").mkdir()
    values = {**TINY, "data": [str(text_dir)], **settings}
    if "model" in settings:
        values["preset"] = None
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(TrainConfig(out="new/run", **values))
    assert not Path("new").exists(), "the --out directory (and the parent made with it) is removed"
    Path("kept").mkdir()
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(TrainConfig(out="kept", **values))
    assert Path("kept").is_dir(), "a directory that existed before stays"
