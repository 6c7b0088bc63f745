"""Collider in the Hugging Face Trainer (sparsetrain.hf_trainer): a few steps on
a tiny random Llama; the first optimizer step's gradients against the float64
reference over every kept token of its accumulated micro-batches; TRL's
SFTTrainer through ``with_collider``."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sparsetrain.collider import masked_cross_entropy  # noqa: E402
from sparsetrain.collider.hf import uses_engine  # noqa: E402
from sparsetrain.errors import ConfigError  # noqa: E402

from hf_reference import assert_grads_close, float64_norms, fresh_seed, make_model, reference_backward  # noqa: E402


@pytest.fixture(autouse=True)
def _float64_norms():
    with float64_norms():
        yield


def _texts(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    words = "the gradient flows through kept tokens only while dropped keys stay constant in every layer".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n)]


def _dataset(tokenizer, texts: list[str]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in texts]})


class _Recorder:
    """Each training forward's batch and the selector's mask; the gradients at
    the first optimizer step (before the optimizer touches the weights)."""

    def __init__(self) -> None:
        self.batches: list[tuple[dict, torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] | None = None


def test_trainer_accumulates_the_kept_rows_loss_over_micro_batches(tmp_path) -> None:
    from transformers import DataCollatorForLanguageModeling, TrainerCallback, TrainingArguments

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer, local_tokenizer

    seed = fresh_seed()
    texts = _texts(16, seed)
    tok = local_tokenizer(texts, 300)
    model = make_model("llama", seed, vocab_size=len(tok))
    initial = copy.deepcopy(model)
    rec = _Recorder()

    class FirstStepGrads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            if rec.grads is None:
                rec.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    def record(module, args, kwargs, output):  # the batch and the keep mask its forward chose
        if torch.is_grad_enabled():
            batch = {k: kwargs[k].clone() for k in ("input_ids", "labels", "attention_mask") if k in kwargs}
            rec.batches.append((batch, trainer.collider_selector.last_mask.clone()))
            counts.append(kwargs.get("collider_n_valid"))

    counts: list = []  # the target count each training forward was handed (no count on the device)

    model.register_forward_hook(record, with_kwargs=True)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", max_grad_norm=0.0, learning_rate=1e-3, seed=seed % 1000,
                             dataloader_num_workers=0)
    trainer = ColliderTrainer(model=model, args=args, train_dataset=_dataset(tok, texts),
                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                              callbacks=[FirstStepGrads()], collider=ColliderArguments(drop_ratio=0.5))
    assert uses_engine(trainer.model)
    trainer.train()

    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:  # every micro-batch keeps ceil(half) of its targets
        assert 0.45 <= h["collider_kept_fraction"] <= 0.6 and h["collider_backward_seconds"] > 0, h
    from sparsetrain.collider.hf import collider_targets

    assert len(counts) == len(rec.batches) == 6
    for (batch, _), n in zip(rec.batches, counts):
        assert n == int((collider_targets(batch["labels"], None, batch.get("attention_mask")) != -100).sum())
    # the first step: two micro-batches, one loss over all their kept tokens

    first = rec.batches[:2]
    total = sum(int(keep.sum()) for _, keep in first)
    for batch, keep in first:
        targets = collider_targets(batch["labels"], None, batch.get("attention_mask"))
        share = int(keep.sum()) / total
        reference_backward(initial, lambda logits: masked_cross_entropy(logits, targets, keep) * share, keep,
                           batch["input_ids"])
    want = {n: p.grad.double() for n, p in initial.named_parameters() if p.grad is not None}
    assert_grads_close({n: g.double() for n, g in rec.grads.items()}, want)


def test_threshold_selection_with_accumulation_is_refused(tmp_path) -> None:
    from transformers import TrainingArguments

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer

    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 1"):
        ColliderTrainer(model=make_model("llama", 0), args=args, collider=ColliderArguments(method="threshold"))
    with pytest.raises(ConfigError, match="drop_ratio must be in"):
        ColliderArguments(drop_ratio=1.0)


def test_sft_trainer_with_collider_and_lora(tmp_path) -> None:
    """TRL's SFTTrainer (its fused-head loss bypassed) with a LoRA config: a few
    steps train only the adapters and log the kept fraction."""
    trl = pytest.importorskip("trl", reason="TRL is not installed")
    pytest.importorskip("peft")
    from peft import LoraConfig

    from sparsetrain.hf_trainer import ColliderArguments, local_tokenizer, with_collider

    seed = fresh_seed()
    texts = _texts(12, seed)
    tok = local_tokenizer(texts, 300)
    model = make_model("qwen2", seed, vocab_size=len(tok), dtype=torch.float32)
    from datasets import Dataset

    cfg = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, logging_steps=1,
                        report_to=[], use_cpu=True, save_strategy="no", max_length=32, bf16=False)
    trainer = with_collider(trl.SFTTrainer)(
        model=model, args=cfg, train_dataset=Dataset.from_dict({"text": texts}), processing_class=tok,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        collider=ColliderArguments(drop_ratio=0.5))
    assert uses_engine(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(0.45 <= h["collider_kept_fraction"] <= 0.6 for h in logs), logs
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed), changed


def _run_example(script: str, *argv: str, cwd) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    proc = subprocess.run([sys.executable, str(root / "examples" / script), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_finetune_example_trains_and_saves(corpus_dir, tmp_path) -> None:
    """examples/hf_finetune.py: a random small Llama with LoRA and gradient
    checkpointing on a text folder; the saved adapters read back."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    stdout = _run_example("hf_finetune.py", "--data", str(corpus_dir), "--steps", "2", "--batch", "2", "--seq", "32",
                          "--hidden", "64", "--layers", "2", "--vocab", "300", "--lora", "4",
                          "--gradient-checkpointing", "--out", str(out), cwd=tmp_path)
    assert "kept 0.500" in stdout and (out / "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
