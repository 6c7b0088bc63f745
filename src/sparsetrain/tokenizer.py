"""Byte-level BPE tokenizer, trained locally with Hugging Face ``tokenizers``.

Byte-level means every string round-trips exactly: unknown characters fall back
to their UTF-8 bytes, which are all in the base alphabet.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import DataError

EOT = "<|endoftext|>"


class BPETokenizer:
    """A thin wrapper with the four things training needs: encode, decode,
    the end-of-text id that separates documents, and save/load."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        # text that spells <|endoftext|> is text: documents are separated by the id
        # (data.join_documents), never by a string inside one
        tokenizer.encode_special_tokens = True
        eot = tokenizer.token_to_id(EOT)
        if eot is None:
            raise DataError(f"tokenizer has no {EOT} token")
        self.eot_id: int = eot

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn merges on ``texts`` until ``vocab_size`` tokens (256 bytes + EOT + merges)."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise DataError(f"cannot load tokenizer {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """The ids of ``text`` and each one's ``(start, end)`` in ``text``'s characters."""
        enc = self._tok.encode(text)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents in parallel (Rust threads)."""
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in fast(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def byte_lengths(self) -> list[int]:
        """UTF-8 bytes each token id stands for, indexed by id: 0 for special tokens
        (end-of-text). Byte-level BPE writes every byte as one character of its
        alphabet, so a token's length in characters is its length in bytes."""
        lengths = [0] * self.vocab_size
        special = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        for token, i in self._tok.get_vocab(with_added_tokens=False).items():
            lengths[i] = 0 if token in special else len(token)
        return lengths
