"""Collider in the Hugging Face Trainer (sparsetrain.hf_trainer): a few steps on
a tiny random Llama; the first optimizer step's gradients against the float64
reference over every kept token of its accumulated micro-batches; TRL's
SFTTrainer through ``with_collider``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sparsetrain.collider import masked_cross_entropy  # noqa: E402
from sparsetrain.collider.hf import uses_engine  # noqa: E402
from sparsetrain.errors import ConfigError  # noqa: E402

from conftest import requires_cuda  # noqa: E402
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


def _dataset(tokenizer, texts: list[str]) -> list[dict]:
    """A plain list of examples, which the Trainer takes as it is: the tests that
    also run on CUDA machines must not need ``datasets`` (not always installed)."""
    return [{"input_ids": tokenizer(t)["input_ids"]} for t in texts]


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


def test_steps_run_under_the_trainers_kernel_policy(tmp_path) -> None:
    """The policy given in ColliderArguments is the one every training forward,
    every backward and every evaluation forward sees; the process's is back after."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from sparsetrain import kernels
    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer, local_tokenizer

    seed = fresh_seed()
    texts = _texts(8, seed)
    tok = local_tokenizer(texts, 300)
    model = make_model("llama", seed, vocab_size=len(tok))
    seen: dict[str, list] = {"train": [], "eval": [], "backward": []}

    def forward_hook(module, args, output):
        seen["train" if torch.is_grad_enabled() else "eval"].append(kernels.current())

    def backward_hook(grad):
        seen["backward"].append(kernels.current())

    model.register_forward_hook(forward_hook)
    model.model.embed_tokens.weight.register_hook(backward_hook)  # the backward's last gradient
    before = kernels.current()
    want = before.replace(fused_cross_entropy=not before.fused_cross_entropy, attention_impl="recompute",
                          kept_kernel_max_keep=0.25)
    data = _dataset(tok, texts)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=2, report_to=[], use_cpu=True, save_strategy="no",
                             dataloader_num_workers=0)
    fields = {f: getattr(want, f) for f in ("fused_cross_entropy", "attention_impl", "kept_kernel_max_keep")}
    trainer = ColliderTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                              data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                              collider=ColliderArguments(drop_ratio=0.5, kernels=fields))
    assert trainer.collider_args.kernels == want
    trainer.train()
    trainer.evaluate()
    assert len(seen["train"]) == 2 and seen["backward"] and seen["eval"], {k: len(v) for k, v in seen.items()}
    assert all(p == want for ps in seen.values() for p in ps)
    assert kernels.current() == before


def test_kernel_policy_refusals_name_the_value() -> None:
    from sparsetrain.hf_trainer import ColliderArguments

    with pytest.raises(ConfigError, match="unknown field 'fused_ce'"):
        ColliderArguments(kernels={"fused_ce": False})
    with pytest.raises(ConfigError, match="kernels.attention_impl .* must be one of .*got 'fast'"):
        ColliderArguments(kernels={"attention_impl": "fast"})
    with pytest.raises(ConfigError, match="KernelPolicy or a mapping of its fields, got str"):
        ColliderArguments(kernels="recompute")
    with pytest.raises(ConfigError, match="collider kernels: "):
        ColliderArguments(kernels={"cusparselt_min_width": "wide"})


def test_a_mapping_changes_only_its_fields_of_the_process_policy() -> None:
    from sparsetrain import kernels
    from sparsetrain.hf_trainer import ColliderArguments

    process = kernels.current().replace(attention_impl="flash", cusparselt_min_width=640)
    with kernels.using(process):  # as an environment override would have set it
        got = ColliderArguments(kernels={"fused_cross_entropy": not process.fused_cross_entropy}).kernels
    assert got == process.replace(fused_cross_entropy=not process.fused_cross_entropy)


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


def test_finetune_example_with_a_reference_keeps_spans_by_excess_loss(corpus_dir, tmp_path) -> None:
    """examples/hf_finetune.py twice: a reference on the folder, then a run that
    reads the reference's losses (--reference) and keeps whole spans; a
    reference with another tokenizer is refused in one line."""
    small = ("--steps", "2", "--batch", "2", "--seq", "32", "--hidden", "64", "--layers", "2", "--vocab", "300")
    _run_example("hf_finetune.py", "--data", str(corpus_dir), *small, "--out", str(tmp_path / "ref"), cwd=tmp_path)
    stdout = _run_example("hf_finetune.py", "--data", str(corpus_dir), *small, "--reference", str(tmp_path / "ref"),
                          "--span", "8", "--drop", "0.5", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert f"selection: excess score, spans of 8 token(s), drop 0.5, reference losses of {tmp_path / 'ref'}" in stdout
    assert "kept 0.500" in stdout and (tmp_path / "run" / "model.safetensors").exists()
    import os
    import subprocess
    import sys
    from pathlib import Path

    other = tmp_path / "other"  # a model whose tokenizer was learned with another vocabulary size
    _run_example("hf_finetune.py", "--data", str(corpus_dir), *small[:-1], "280", "--out", str(other), cwd=tmp_path)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "hf_finetune.py"), "--data", str(corpus_dir),
                           *small, "--model", str(other), "--reference", str(tmp_path / "ref"),
                           "--out", str(tmp_path / "bad")], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"hf_finetune.py: error: --reference {tmp_path / 'ref'} "
                                                           "has another tokenizer than the model's")


def test_finetune_example_filters_blocks_by_reference_loss(corpus_dir, tmp_path) -> None:
    """--filter: the blocks of highest mean loss of the reference, or of --model itself without one, left out
    before a dense run; with neither, or outside (0, 1), refused in one line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    small = ("--steps", "2", "--batch", "2", "--seq", "32", "--hidden", "64", "--layers", "2", "--vocab", "300")
    _run_example("hf_finetune.py", "--data", str(corpus_dir), *small, "--out", str(tmp_path / "ref"), cwd=tmp_path)
    stdout = _run_example("hf_finetune.py", "--data", str(corpus_dir), *small, "--reference", str(tmp_path / "ref"),
                          "--filter", "0.3", "--drop", "0", "--out", str(tmp_path / "run"), cwd=tmp_path)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("filter: kept "))
    kept, total = (int(x) for x in line.split()[2:5:2])
    # at least 0.3 of the tokens left out, and no more than one block past it (blocks are of equal length)
    assert total - (int(0.3 * total) + 1) <= kept <= total - 0.3 * total, line
    assert "selection: none (drop 0: every token back-propagated)" in stdout
    assert "left out the highest mean loss of the reference" in line
    # without --reference the model to fine-tune scores its own blocks before it trains
    stdout = _run_example("hf_finetune.py", "--data", str(corpus_dir), *small, "--model", str(tmp_path / "ref"),
                          "--filter", "0.3", "--drop", "0", "--out", str(tmp_path / "self"), cwd=tmp_path)
    line = next(ln for ln in stdout.splitlines() if ln.startswith("filter: kept "))
    kept, total = (int(x) for x in line.split()[2:5:2])
    assert total - (int(0.3 * total) + 1) <= kept <= total - 0.3 * total, line
    assert "left out the highest mean loss of the model" in line and (tmp_path / "self" / "model.safetensors").exists()
    root = Path(__file__).resolve().parents[1]
    for extra, message in ((("--filter", "0.3"), "--filter 0.3 scores the blocks with --reference or, without one, "
                                                 "with --model itself; a random model scores nothing: give one of them"),
                           (("--filter", "1.5", "--reference", str(tmp_path / "ref")),
                            "--filter must be in (0, 1), got 1.5")):
        proc = subprocess.run([sys.executable, str(root / "examples" / "hf_finetune.py"), "--data", str(corpus_dir),
                               *small, *extra, "--out", str(tmp_path / "bad")], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(root / "src")}, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 2 and proc.stderr.strip() == f"hf_finetune.py: error: {message}", proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_finetune_example_refuses_a_cuda_graph_on_the_cpu_in_one_line(corpus_dir, tmp_path) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "hf_finetune.py"), "--data", str(corpus_dir),
                           "--steps", "1", "--batch", "2", "--seq", "32", "--hidden", "64", "--layers", "2",
                           "--vocab", "300", "--cuda-graph", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root / "src")},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("hf_finetune.py: error: collider cuda_graph with device cpu "
                                                    "(CUDA graphs need a CUDA device) is not available")
    assert "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- CUDA graph (ColliderArguments.cuda_graph)


def _fixed_length_dataset(vocab: int, pad_id: int, n: int, length: int, seed: int, short: int | None = None):
    """``n`` random sequences of ``length`` tokens (never the pad token, so every
    position is a target); with ``short``, sequence ``short`` is 5 tokens shorter,
    so its batch is padded and has fewer targets. A plain list of examples, which
    the Trainer takes as it is: the CUDA tests run where ``datasets`` is not installed."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, vocab - 1, (length - (5 if i == short else 0),), generator=g)
        rows.append({"input_ids": [int(t) + (1 if t >= pad_id else 0) for t in ids]})
    return rows


def _graph_tokenizer(seed: int):
    from sparsetrain.hf_trainer import local_tokenizer

    return local_tokenizer(_texts(8, seed), 200)


def _use_stand_in_graph(monkeypatch) -> None:
    """The CPU's stand-in for the CUDA graph: the recorded body re-run at each replay."""
    from replaying_graph import ReplayingStepGraph
    from sparsetrain.hf_trainer import ColliderTrainerMixin

    monkeypatch.setattr(ColliderTrainerMixin, "_setup_collider_graph", lambda self: ReplayingStepGraph(self.args.device))


def _in_order_trainer(**kwargs):
    """A ``ColliderTrainer`` taking its batches in dataset order, so that a padded
    batch comes where a test says."""
    from sparsetrain.hf_trainer import ColliderTrainer

    class InOrder(ColliderTrainer):
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    return InOrder(**kwargs)


def _graph_run(tmp_path, name: str, graph: bool, monkeypatch, method: str, short: int | None, seed: int,
               cuda: bool = False, excess_span: int = 0):
    """``excess_span``: select by the excess score over spans of that many
    tokens, reading a reference_losses column (packed rows: no padding)."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments, default_data_collator

    from sparsetrain.hf_trainer import ColliderArguments, add_reference_losses

    tok = _graph_tokenizer(seed)
    model = make_model("llama", seed, dtype=torch.float32, vocab_size=len(tok))
    if graph and not cuda:
        _use_stand_in_graph(monkeypatch)
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=6, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, logging_steps=1, report_to=[], use_cpu=not cuda,
                             save_strategy="no", max_grad_norm=1.0, learning_rate=1e-3, seed=seed % 1000,
                             dataloader_num_workers=0)
    data = _fixed_length_dataset(len(tok), tok.pad_token_id, 24, 16, seed, short)
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    selection = dict(method=method)
    if excess_span:
        from datasets import Dataset

        reference = make_model("llama", seed + 1, dtype=torch.float32, vocab_size=len(tok))
        data = Dataset.from_list([{**row, "labels": row["input_ids"]} for row in data])
        data = add_reference_losses(data, reference)
        collator, selection = default_data_collator, dict(method=method, score="excess", span=excess_span)
    trainer = _in_order_trainer(
        model=model, args=args, train_dataset=data, data_collator=collator,
        collider=ColliderArguments(drop_ratio=0.5, warmup_steps=1, cuda_graph=graph, seed=seed % 1000, **selection))
    trainer.train()
    monkeypatch.undo()
    return trainer


@pytest.mark.parametrize("method, short", [("topk", None), ("random", 17), ("random", 5)],
                         ids=["topk", "random-one-padded-batch", "random-padded-batch-in-the-warm-up"])
def test_replayed_micro_steps_train_like_eager_ones(tmp_path, monkeypatch, method: str, short) -> None:
    """The Trainer's side of the graph (static inputs, gradients added into .grad
    outside it, the warm-up runs, the eager fallback for a batch of another target
    count, the selector's generator) against the same training without it:
    equal losses and weights, float32 on the CPU, with gradient accumulation."""
    seed = fresh_seed()
    eager = _graph_run(tmp_path, "eager", False, monkeypatch, method, short, seed)
    graphed = _graph_run(tmp_path, "graph", True, monkeypatch, method, short, seed)
    g = graphed.collider_graph
    micro_steps = 6 * 2
    warmup_micro = 1 * 2  # the selection's warmup step runs eagerly
    if short == 5:  # micro-step 3 (sequences 4 and 5), the graph's first: the warm-up restarts after it
        skipped = 1
    else:  # micro-step 9 (sequences 16 and 17) has fewer targets: it runs eagerly after the capture
        skipped = 0 if short is None else 1
    assert g.captures == 1 and g.replays == micro_steps - warmup_micro - 3 - skipped
    logs_e = [h for h in eager.state.log_history if "loss" in h]
    logs_g = [h for h in graphed.state.log_history if "loss" in h]
    assert sum(h["collider_graph_steps"] for h in logs_g) == g.replays
    assert len(logs_e) == len(logs_g) == 6
    for a, b in zip(logs_e, logs_g):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["collider_kept_fraction"] == a["collider_kept_fraction"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_graph_refusals_name_the_value(tmp_path) -> None:
    from transformers import TrainingArguments

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer

    with pytest.raises(ConfigError, match="cuda_graph needs a kept count fixed ahead .* got method 'threshold'"):
        ColliderArguments(method="threshold", cuda_graph=True)
    cases = [(dict(gradient_checkpointing=True), "gradient_checkpointing"),
             (dict(optim="adalomo"), "optim adalomo (it updates in backward hooks"),
             ({}, "device cpu (CUDA graphs need a CUDA device)")]
    for extra, named in cases:
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **extra)
        with pytest.raises(ConfigError, match="collider cuda_graph with") as e:
            ColliderTrainer(model=make_model("llama", 0, dtype=torch.float32), args=args,
                            collider=ColliderArguments(cuda_graph=True))
        assert named in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="LlamaForCausalLM on the generic path"):
        ColliderTrainer(model=make_model("llama", 0, dtype=torch.float32),
                        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                        collider=ColliderArguments(cuda_graph=True, engine=False))
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(make_model("llama", 0, dtype=torch.float32),
                               peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ConfigError, match="collider cuda_graph with LoRA dropout 0.1 .* set lora_dropout=0"):
        ColliderTrainer(model=lora, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                        collider=ColliderArguments(cuda_graph=True))


@requires_cuda
@pytest.mark.parametrize("short", [17, 5], ids=["padded-batch-after-the-capture", "padded-batch-in-the-warm-up"])
def test_captured_micro_steps_on_cuda(tmp_path, monkeypatch, short: int) -> None:
    """A real capture (its warm-up on the side stream, restarted by a padded batch
    in one case): float32 losses and weights as without the graph, within the
    GPU's reduction-order rounding; the graph replayed."""
    seed = fresh_seed()
    eager = _graph_run(tmp_path, "eager", False, monkeypatch, "random", short, seed, cuda=True)
    graphed = _graph_run(tmp_path, "graph", True, monkeypatch, "random", short, seed, cuda=True)
    assert graphed.collider_graph.captured
    assert sum(h["collider_graph_steps"] for h in graphed.state.log_history if "loss" in h) == 6
    for a, b in zip([h for h in eager.state.log_history if "loss" in h],
                    [h for h in graphed.state.log_history if "loss" in h]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_replayed_micro_steps_with_reference_losses_train_like_eager_ones(tmp_path, monkeypatch) -> None:
    """The excess score over spans reads the reference_losses column: as a static
    input of the graph, each replay scores its own batch's column (equal losses
    and weights to the same training without the graph)."""
    seed = fresh_seed()
    eager = _graph_run(tmp_path, "eager", False, monkeypatch, "topk", None, seed, excess_span=4)
    graphed = _graph_run(tmp_path, "graph", True, monkeypatch, "topk", None, seed, excess_span=4)
    assert graphed.collider_graph.captures == 1 and graphed.collider_graph.replays == 12 - 2 - 3
    for a, b in zip([h for h in eager.state.log_history if "loss" in h],
                    [h for h in graphed.state.log_history if "loss" in h]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), seed
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"{name}, seed {seed}")


@requires_cuda
def test_captured_micro_steps_with_reference_losses_on_cuda(tmp_path, monkeypatch) -> None:
    """A real capture with the excess score over spans: the column a static input,
    each replay scoring its own batch; losses and weights as without the graph."""
    pytest.importorskip("datasets")  # add_reference_losses maps a datasets.Dataset
    seed = fresh_seed()
    eager = _graph_run(tmp_path, "eager", False, monkeypatch, "topk", None, seed, cuda=True, excess_span=4)
    graphed = _graph_run(tmp_path, "graph", True, monkeypatch, "topk", None, seed, cuda=True, excess_span=4)
    assert graphed.collider_graph.captured
    for a, b in zip([h for h in eager.state.log_history if "loss" in h],
                    [h for h in graphed.state.log_history if "loss" in h]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), seed
    for (name, a), b in zip(eager.model.named_parameters(), graphed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{name}, seed {seed}")


def test_replayed_batches_are_checked_in_the_steps_one_host_read(tmp_path, monkeypatch) -> None:
    """A replayed forward cannot read the device, so the padding and position
    checks of each batch come with the step's target counts: a left-padded
    batch is refused there with the engine's own message, a right-padded one
    gives its counts."""
    from transformers import TrainingArguments

    from sparsetrain.hf_trainer import ColliderArguments, ColliderTrainer

    _use_stand_in_graph(monkeypatch)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = ColliderTrainer(model=make_model("llama", 0, dtype=torch.float32), args=args,
                              collider=ColliderArguments(cuda_graph=True))
    ids = torch.randint(0, 100, (2, 12))
    right = torch.ones(2, 12, dtype=torch.long)
    right[1, 9:] = 0
    labels = ids.masked_fill(right == 0, -100)
    good = {"input_ids": ids, "labels": labels, "attention_mask": right}
    batches, count = trainer.get_batch_samples(iter([good, good]), 2, torch.device("cpu"))
    assert trainer._collider_n_valid == [11 + 8] * 2 and int(count) == 2 * math.ceil(19 / 2)
    left = {**good, "attention_mask": right.flip(-1)}
    with pytest.raises(ValueError, match="right padding only"):
        trainer.get_batch_samples(iter([good, left]), 2, torch.device("cpu"))
    with pytest.raises(ValueError, match="positions 0 .. T-1"):
        trainer.get_batch_samples(iter([{**good, "position_ids": torch.arange(12).roll(1).expand(2, 12)}]), 1,
                                  torch.device("cpu"))


def test_batches_of_ever_new_shapes_warn_and_stop_restarting(tmp_path, monkeypatch) -> None:
    """Padded batches whose shape or target count changes every micro-step: the
    warm-up restarts a bounded number of times, the run trains on eagerly, and
    one warning names the cause."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from sparsetrain.hf_trainer import MAX_WARMUP_RESTARTS, ColliderArguments

    seed = fresh_seed()
    tok = _graph_tokenizer(seed)
    _use_stand_in_graph(monkeypatch)
    rows = [[5 + (i % 50)] * (6 + i) for i in range(24)]  # lengths 6 .. 29: every batch pads to another length
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    trainer = _in_order_trainer(model=make_model("llama", seed, dtype=torch.float32, vocab_size=len(tok)), args=args,
                                train_dataset=[{"input_ids": r} for r in rows],
                                data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                collider=ColliderArguments(drop_ratio=0.5, cuda_graph=True))
    with pytest.warns(UserWarning, match="micro-steps so far did not fit the graph and 0 replayed"):
        trainer.train()
    assert not trainer.collider_graph.captured and trainer._collider_graph_restarts == MAX_WARMUP_RESTARTS
    assert trainer.state.global_step == 12


# ----------------------------------------------------------------------------- review fixes


def _loss_logs(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_filtered_data_trains_with_a_score_that_reads_no_reference_losses(tmp_path) -> None:
    """add_reference_losses then filter_by_reference_losses, then training with the
    default score: the leftover reference_losses column (ragged, which the
    language-modelling collator cannot stack) is dropped like any column the
    forward does not take, so the run equals one on the data without it."""
    pytest.importorskip("datasets")
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from sparsetrain.hf_trainer import (ColliderArguments, ColliderTrainer, add_reference_losses,
                                        filter_by_reference_losses, local_tokenizer)

    seed = fresh_seed()
    texts = _texts(16, seed)
    tok = local_tokenizer(texts, 300)
    data = Dataset.from_list(_dataset(tok, texts))
    reference = make_model("llama", seed + 1, vocab_size=len(tok))
    filtered = filter_by_reference_losses(add_reference_losses(data, reference), 0.25)
    runs = []
    for name, train in (("with", filtered), ("without", filtered.remove_columns("reference_losses"))):
        args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                 seed=seed % 1000, dataloader_num_workers=0)
        trainer = ColliderTrainer(model=make_model("llama", seed, dtype=torch.float32, vocab_size=len(tok)),
                                  args=args, train_dataset=train,
                                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                  collider=ColliderArguments(drop_ratio=0.5))
        trainer.train()
        runs.append(trainer)
    assert len(_loss_logs(runs[0])) == 2 and _loss_logs(runs[0]) == _loss_logs(runs[1]), seed
    for (name, a), b in zip(runs[1].model.named_parameters(), runs[0].model.parameters()):
        assert torch.equal(a, b), (name, seed)


def _small_run(tmp_path, name: str, seed: int, steps: int, *, resume: str | None = None, method: str = "random",
               accumulation: int = 2, **trainer_kwargs):
    """A few steps of ``method`` selection (random by default) with gradient
    accumulation, batches in dataset order, a checkpoint every 2 steps; returns
    the trainer."""
    from transformers import DataCollatorForLanguageModeling, TrainingArguments

    from sparsetrain.hf_trainer import ColliderArguments, local_tokenizer

    texts = _texts(24, seed)
    tok = local_tokenizer(texts, 300)
    trainer_kwargs.setdefault("model", None)
    if trainer_kwargs["model"] is None and "model_init" not in trainer_kwargs:
        trainer_kwargs["model"] = make_model("llama", seed, dtype=torch.float32, vocab_size=len(tok))
    args = TrainingArguments(output_dir=str(tmp_path / name), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accumulation, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="steps", save_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                             seed=seed % 1000, dataloader_num_workers=0)
    trainer = _in_order_trainer(args=args, train_dataset=_dataset(tok, texts),
                                data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                                collider=ColliderArguments(drop_ratio=0.5, method=method, warmup_steps=1,
                                                           seed=seed % 1000),
                                **{k: v for k, v in trainer_kwargs.items() if v is not None})
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _assert_same_training(got, want, seed: int, steps=None) -> None:
    logs_g = [(h["step"], h["loss"], h["collider_kept_fraction"]) for h in got.state.log_history if "loss" in h]
    logs_w = [(h["step"], h["loss"], h["collider_kept_fraction"]) for h in want.state.log_history if "loss" in h]
    if steps is not None:
        logs_w = [h for h in logs_w if h[0] in steps]
    assert logs_g and logs_g == logs_w, seed
    for (name, a), b in zip(want.model.named_parameters(), got.model.parameters()):
        assert torch.equal(a, b), (name, seed)


def test_a_model_from_model_init_trains_as_a_given_one(tmp_path) -> None:
    """Trainer.train() builds a fresh model from model_init: it gets Collider
    (and a fresh selector) as a given model does, so the two runs' losses, kept
    fractions and weights agree."""
    from sparsetrain.collider.hf import applied_state
    from sparsetrain.hf_trainer import local_tokenizer

    seed = fresh_seed()
    vocab = len(local_tokenizer(_texts(24, seed), 300))
    given = _small_run(tmp_path, "given", seed, 4)
    built = _small_run(tmp_path, "init", seed, 4,
                       model_init=lambda: make_model("llama", seed, dtype=torch.float32, vocab_size=vocab))
    assert applied_state(built.model).selector is built.collider_selector
    _assert_same_training(built, given, seed)


@pytest.mark.parametrize("method, accumulation", [("random", 2), ("threshold", 1)])
def test_a_resumed_run_trains_as_an_uninterrupted_one(tmp_path, method: str, accumulation: int) -> None:
    """Random selection draws from the selector's generator, the threshold's
    controller adapts from step to step: each checkpoint holds the selector's
    state, and a run resumed from step 2 of 4 ends with the losses, kept
    fractions and weights of the run never stopped."""
    import os

    seed = fresh_seed()
    straight = _small_run(tmp_path, "straight", seed, 4, method=method, accumulation=accumulation)
    _small_run(tmp_path, "part", seed, 2, method=method, accumulation=accumulation)
    checkpoint = tmp_path / "part" / "checkpoint-2"
    assert "collider_selector.pt" in os.listdir(checkpoint)
    resumed = _small_run(tmp_path, "part", seed, 4, resume=str(checkpoint), method=method, accumulation=accumulation)
    _assert_same_training(resumed, straight, seed)


def test_a_plain_trainer_with_a_selector_is_refused_in_one_line(tmp_path) -> None:
    """A plain Trainer hands the forward its target count as num_items_in_batch,
    where the kept count belongs (its loss and gradients would shrink by the
    kept fraction): ColliderCallback refuses it before the first step, naming
    ColliderTrainer; ColliderTrainer's own callback trains."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from sparsetrain.collider import apply
    from sparsetrain.hf_trainer import ColliderCallback, local_tokenizer
    from sparsetrain.selection import TokenSelector

    seed = fresh_seed()
    texts = _texts(8, seed)
    tok = local_tokenizer(texts, 300)
    model = make_model("llama", seed, dtype=torch.float32, vocab_size=len(tok))
    before = copy.deepcopy(model.state_dict())
    selector = TokenSelector(keep_ratio=0.5)
    apply(model, selector=selector)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tok, texts),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[ColliderCallback(selector)])
    with pytest.raises(ConfigError) as e:
        trainer.train()
    assert str(e.value).startswith("ColliderCallback: a plain transformers Trainer divides the kept tokens' loss by "
                                   "its target count") and "ColliderTrainer" in str(e.value)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
    # without the callback (what a user of a plain Trainer has): the forward itself refuses the target count
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(tok, texts),
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    with pytest.raises(ConfigError, match="num_items_in_batch with a Collider selector must count the kept tokens: "
                                          "a plain transformers Trainer passes its target count") as e:
        trainer.train()
    assert "\n" not in str(e.value) and "ColliderTrainer" in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())
