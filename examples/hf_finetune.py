"""Fine-tune a Hugging Face causal LM with Collider on a folder of text files.

By default the model is a small randomly initialised Llama and the tokenizer
a byte-level BPE learned on the folder (no hub access needed); ``--model PATH``
loads a local checkpoint and its tokenizer instead. The text is packed into
blocks of ``--seq`` tokens and trained with ``sparsetrain.hf_trainer.ColliderTrainer``
(``transformers.Trainer`` plus Collider: each training forward keeps
``1 - --drop`` of the target tokens in the backward of every layer).

    python examples/hf_finetune.py --data path/to/texts --steps 200
    python examples/hf_finetune.py --data path/to/texts --model path/to/llama --lora 16 --drop 0.5

On a noisy corpus, keep what a reference finds learnable (Rho-1's excess loss,
averaged over spans): train the reference on a small clean sample first, from
the same model, then point ``--reference`` at it. Its loss of every token is
computed once, before training (``sparsetrain.hf_trainer.add_reference_losses``):

    python examples/hf_finetune.py --data clean_sample --model path/to/llama --out runs/ref
    python examples/hf_finetune.py --data noisy_corpus --model path/to/llama --reference runs/ref --span 32 --drop 0.4

Or leave out, once, the blocks the reference finds hardest and train the rest
densely (``--filter 0.4 --drop 0``; ``sparsetrain.hf_trainer.filter_by_reference_losses``):
where the noise comes in whole documents this did better than the span score
(docs/time_to_quality.md). The filter needs no trained reference: without
``--reference`` the blocks are scored by ``--model`` itself, before it trains,
which filtered as well as a reference in those races:

    python examples/hf_finetune.py --data noisy_corpus --model path/to/llama --filter 0.4 --drop 0

Blocks are packed across documents, so a block is the unit here;
``sparsetrain corpus filter`` leaves out whole files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SUFFIXES = (".txt", ".md", ".rst", ".py")


def fail(message: str) -> None:
    """Bad input: one line naming the value, exit 2, as the sparsetrain CLI does."""
    print(f"hf_finetune.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_texts(folder: Path) -> list[str]:
    """Every text file under ``folder`` (by suffix), as one string each."""
    if not folder.is_dir():
        fail(f"--data {folder} is not a folder")
    texts = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in SUFFIXES:
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue
    if not texts:
        fail(f"--data {folder} holds no {'/'.join(SUFFIXES)} files")
    return texts


def packed_blocks(texts: list[str], tokenizer, seq: int) -> list[list[int]]:
    """The texts tokenised, joined by end-of-text, cut into blocks of ``seq`` tokens."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    blocks = [ids[i:i + seq] for i in range(0, len(ids) - seq + 1, seq)]
    if not blocks:
        fail(f"the folder holds {len(ids)} tokens, fewer than one block of --seq {seq}")
    return blocks


def load_model(args: argparse.Namespace, texts: list[str]):
    """``(model, tokenizer)``: the checkpoint at ``--model``, or a random small Llama
    (with ``--reference``'s tokenizer when given, else one learned on ``texts``)."""
    import transformers

    if args.model:
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        return model, tok
    from sparsetrain.hf_trainer import local_tokenizer

    if args.reference:  # the reference's token ids are the ones its losses are of
        tok = transformers.AutoTokenizer.from_pretrained(args.reference)
    else:
        tok = local_tokenizer(texts, args.vocab)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                   num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=args.seq,
                                   tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    return transformers.LlamaForCausalLM(cfg), tok


def main() -> None:
    ap = argparse.ArgumentParser(description="Fine-tune a Hugging Face causal LM with Collider on a text folder.")
    ap.add_argument("--data", type=Path, required=True, help="folder of .txt/.md/.rst/.py files")
    ap.add_argument("--model", help="local checkpoint folder (default: a random small Llama)")
    ap.add_argument("--out", type=Path, default=Path("runs/hf_finetune"))
    ap.add_argument("--drop", type=float, default=0.5, help="fraction of target tokens dropped from the backward")
    ap.add_argument("--method", default="topk", help="selection method (topk, random, threshold, ...)")
    ap.add_argument("--score", help="token score (collider, loss, entropy, ...; default: excess with --reference, "
                                    "else collider)")
    ap.add_argument("--reference", type=Path, help="local checkpoint folder of a reference model with this "
                    "tokenizer (the excess score: the model's loss minus the reference's)")
    ap.add_argument("--filter", type=float, default=0.0, help="leave out the blocks of highest mean loss of "
                    "--reference (else of --model itself, before training), this fraction of the tokens, before "
                    "training (0: keep every block)")
    ap.add_argument("--span", type=int, default=1, help="score whole blocks of this many tokens (their mean score)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank on every projection (0: full fine-tuning)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="CUDA: capture each micro-batch's forward and backward in a CUDA graph and replay it")
    ap.add_argument("--report-to", default="none", help="the Trainer's report_to (none, tensorboard, wandb, ...)")
    ap.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary of the random model's tokenizer")
    ap.add_argument("--hidden", type=int, default=256, help="width of the random model (a multiple of 64)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the random model")
    args = ap.parse_args()
    if args.hidden % 64:
        fail(f"--hidden must be a multiple of 64, got {args.hidden}")
    if args.filter and not (args.reference or args.model):
        fail(f"--filter {args.filter} scores the blocks with --reference or, without one, with --model itself; "
             "a random model scores nothing: give one of them")
    if args.filter and not 0.0 < args.filter < 1.0:
        fail(f"--filter must be in (0, 1), got {args.filter}")

    from datasets import Dataset
    from transformers import TrainingArguments, default_data_collator

    from sparsetrain.errors import ConfigError
    from sparsetrain.hf_trainer import (ColliderArguments, ColliderTrainer, add_reference_losses,
                                        filter_by_reference_losses)

    texts = read_texts(args.data)
    model, tok = load_model(args, texts)
    # packed blocks of one length, every token a target (the end-of-text tokens between documents
    # included, which a padding collator would mask as padding): every batch has one shape and
    # target count, which --cuda-graph needs to replay
    blocks = packed_blocks(texts, tok, args.seq)
    train = Dataset.from_dict({"input_ids": blocks, "labels": blocks})
    score = args.score or ("excess" if args.reference else "collider")
    if args.reference:
        import transformers

        if transformers.AutoTokenizer.from_pretrained(args.reference).get_vocab() != tok.get_vocab():
            fail(f"--reference {args.reference} has another tokenizer than the model's: "
                 "train the reference from the same --model")
        reference = transformers.AutoModelForCausalLM.from_pretrained(args.reference, dtype=torch.float32)
        train = add_reference_losses(train, reference.to("cuda" if torch.cuda.is_available() else "cpu"),
                                     batch_size=args.batch)
        del reference
    elif args.filter:  # the model scores its own new data, before it trains on any of it
        train = add_reference_losses(train, model.to("cuda" if torch.cuda.is_available() else "cpu"),
                                     batch_size=args.batch)
    if args.filter:
        n = len(train)
        train = filter_by_reference_losses(train, args.filter)
        print(f"filter: kept {len(train)} of {n} blocks (left out the highest mean loss of "
              f"{'the reference' if args.reference else 'the model'}, {args.filter} of the tokens)")
        if not args.reference:  # no score reads the model's own losses
            train = train.remove_columns("reference_losses")
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.05,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"]))
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.drop:
        print(f"selection: {score} score, spans of {args.span} token(s), drop {args.drop}"
              + (f", reference losses of {args.reference}" if args.reference else ""))
    else:
        print("selection: none (drop 0: every token back-propagated)")
    cuda = torch.cuda.is_available()
    targs = TrainingArguments(output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch,
                              gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
                              lr_scheduler_type="cosine", warmup_steps=min(10, args.steps // 10),
                              logging_steps=max(1, min(10, args.steps)),
                              report_to=args.report_to, bf16=cuda, use_cpu=not cuda, save_strategy="no",
                              dataloader_num_workers=0)
    try:
        trainer = ColliderTrainer(model=model, args=targs, train_dataset=train,
                                  data_collator=default_data_collator,
                                  collider=ColliderArguments(drop_ratio=args.drop, method=args.method,
                                                             score=score, span=args.span,
                                                             cuda_graph=args.cuda_graph))
    except ConfigError as e:  # one line naming the value, exit 2, as the sparsetrain CLI does
        fail(str(e))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "collider_kept_fraction" in e]
    if logged:
        last = logged[-1]
        line = f"last log: loss {last['loss']:.4f}, kept {last['collider_kept_fraction']:.3f}"
        if "collider_backward_seconds" in last:  # replayed micro-steps are not timed
            line += f", backward {last['collider_backward_seconds'] * 1e3:.1f} ms per micro-batch"
        if "collider_graph_steps" in last:
            line += f", {last['collider_graph_steps']} replayed micro-steps"
        print(line)
    trainer.save_model(str(args.out))
    tok.save_pretrained(str(args.out))
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
