"""Masked-language-model data (BERT, Devlin et al. 2019): which positions a batch predicts and
what the model sees there, and the sentence pairs of next-sentence prediction (NSP).

Reserved ids. An MLM needs input ids that no text encodes to: [MASK], and for NSP [CLS] and
[SEP]. lmforge's char and byte tokenizers have no such tokens, and a BPE's own specials
(`<|endoftext|>`, `<|pad|>`, chat markers) already mean something else, so the ids are
reserved after the tokenizer's vocabulary instead: the model's vocab_size grows by
RESERVED_IDS, the tokenizer (and its saved file and hash) stays as it is, and every tokenizer
kind gets the same layout (MLMTokens.after). Two more reserved ids, [IS_NEXT] and [NOT_NEXT],
make the NSP head: it is their two rows of the output layer read at the [CLS] position, a
linear classifier on that hidden state that leaves the model a plain GPT (checkpoints, resume
and lmforge.load need nothing new). The five ids are reserved whenever the objective is mlm,
so a checkpoint's shapes do not depend on train.nsp. No label is ever a reserved id.

Randomness. The masks of a step depend only on the seed, the step and each row's index in
the step's global batch (as RandomWindowLoader lays rows out), each row drawing from its own
generator: the same at any accumulation split or world size, and again after a resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.common import LmforgeError
from lmforge.data.loader import RandomWindowLoader

RESERVED_IDS = 5
"""Ids an MLM model has beyond its tokenizer's vocabulary (MLMTokens)."""


@dataclass(frozen=True)
class MLMTokens:
    """The reserved ids, in this order right after the tokenizer's last id."""

    mask: int
    cls: int
    sep: int
    is_next: int
    not_next: int

    @classmethod
    def after(cls, tokenizer_vocab: int) -> MLMTokens:
        return cls(*range(tokenizer_vocab, tokenizer_vocab + RESERVED_IDS))


def mlm_vocab_size(tokenizer_vocab: int) -> int:
    """The smallest model vocab_size of an MLM over this tokenizer."""
    return tokenizer_vocab + RESERVED_IDS


def row_seed(seed: int, step: int, row: int) -> int:
    """A well-mixed 64-bit seed for one row of one step's global batch."""
    return int(np.random.SeedSequence([seed, step, row]).generate_state(1, np.uint64)[0])


class Masker:
    """BERT's masking: of each row's candidate positions (not a tokenizer special such as
    end-of-text or padding, not a reserved id, not masked out by attention_mask), exactly
    round(mask_prob * candidates) (at least 1) are selected, uniformly; of those 80% become
    [MASK], 10% a random token of the tokenizer's vocabulary, 10% stay as they are, each
    independently. Labels hold the original token at selected positions, -100 elsewhere.

    A fixed count per row (Google's BERT code, not Hugging Face's independent coin per token)
    gives every full row the same number of loss units, which also weighs every sentence
    pair's NSP loss the same (losses.MaskedLMLoss)."""

    def __init__(self, tokenizer_vocab: int, never: Iterable[int] = (), mask_prob: float = 0.15):
        self.tokens = MLMTokens.after(tokenizer_vocab)
        self.vocab = tokenizer_vocab
        self.mask_prob = mask_prob
        reserved = dataclasses.astuple(self.tokens)
        self.never = torch.tensor(sorted({*never, *reserved}))  # ids never selected

    @classmethod
    def for_tokenizer(cls, tokenizer, mask_prob: float = 0.15) -> Masker:
        specials = (tokenizer.eot_id, tokenizer.pad_id, tokenizer.bos_id)
        return cls(tokenizer.vocab_size, [i for i in specials if i is not None], mask_prob)

    def _draw(self, seed: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row's randomness: selection scores, 80/10/10 coins (T,) floats, random ids (T,)."""
        g = torch.Generator().manual_seed(seed)
        return (
            torch.rand(T, generator=g),
            torch.rand(T, generator=g),
            torch.randint(self.vocab, (T,), generator=g),
        )

    def __call__(
        self,
        input_ids: torch.Tensor,
        seeds: Sequence[int],
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) and one seed per row -> (model inputs (B, T), labels (B, T))."""
        B, T = input_ids.shape
        score, coin, random_ids = (torch.stack(x) for x in zip(*(self._draw(s, T) for s in seeds)))
        candidate = ~torch.isin(input_ids, self.never)  # (B, T)
        if attention_mask is not None:
            candidate &= attention_mask.bool()
        count = (candidate.sum(-1) * self.mask_prob).round().clamp(min=1)  # (B,)
        order = torch.where(candidate, score, 2.0).argsort(-1)  # candidates first, shuffled
        rank = order.argsort(-1)  # (B, T): each position's place in that order
        selected = candidate & (rank < count[:, None])
        inputs = torch.where(selected & (coin < 0.8), self.tokens.mask, input_ids)
        inputs = torch.where(selected & (coin >= 0.8) & (coin < 0.9), random_ids, inputs)
        labels = torch.where(selected, input_ids, -100)
        return inputs, labels


class MaskingLoader:
    """A pretraining loader's micro-batches, masked: input_ids as the model sees them, labels
    (the original tokens at selected positions, -100 elsewhere); other keys (nsp_label) pass
    through. Row i of micro-batch m on rank r is row (m * world_size + r) * micro + i of the
    step's global batch, as RandomWindowLoader and SentencePairLoader draw them."""

    def __init__(self, loader, masker: Masker, seed: int, rank: int = 0, world_size: int = 1):
        self.loader, self.masker, self.seed = loader, masker, seed
        self.rank, self.world_size = rank, world_size
        self.steps = 0

    def next_step(self, accum_steps: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for micro, batch in enumerate(self.loader.next_step(accum_steps)):
            B = batch["input_ids"].size(0)
            first = (micro * self.world_size + self.rank) * B
            seeds = [row_seed(self.seed, self.steps, first + i) for i in range(B)]
            inputs, labels = self.masker(batch["input_ids"], seeds, batch.get("attention_mask"))
            out.append({**batch, "input_ids": inputs, "labels": labels})
        self.steps += 1
        return out

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.steps = state["steps"]


class SentencePairLoader(RandomWindowLoader):
    """Next-sentence-prediction rows of block_size tokens, [CLS] A [SEP] B [SEP], with
    nsp_label 0 when B is the text right after A and 1 when it is a span from a random place
    (half each). As in BERT, a "sentence" is a span of contiguous text: A starts at a random
    offset and has a random length (1 to block_size - 4 tokens); B fills the rest. Rows are
    drawn as RandomWindowLoader draws windows (one seeded generator per step, each rank its
    rows), so resume is exact; a random B is the true continuation only by a 1-in-len(data)
    chance. Yields {'input_ids', 'nsp_label'} (MaskingLoader adds the labels)."""

    def __init__(
        self,
        arrays: list[np.ndarray],
        block_size: int,
        micro_batch_size: int,
        seed: int,
        tokens: MLMTokens,
        rank: int = 0,
        world_size: int = 1,
    ):
        if block_size < 5:
            raise LmforgeError(f"train.nsp needs model.block_size >= 5, got {block_size}")
        super().__init__(arrays, block_size, micro_batch_size, seed, rank, world_size)
        self.tokens = tokens

    def pairs(
        self, a: torch.Tensor, other: torch.Tensor, cut: torch.Tensor, not_next: torch.Tensor
    ) -> torch.Tensor:
        """Windows a and other (n, T+1), A's lengths cut (n,) in [1, T-4], not_next (n,) ->
        rows (n, T): [CLS] a[:cut] [SEP] B [SEP], B = a[cut:T-3] or other[:T-3-cut]."""
        T = self.block_size
        j = torch.arange(T)[None, :]  # (1, T)
        cut = cut[:, None]  # (n, 1)
        from_a = a.gather(1, (j - 1).clamp(min=0).expand(len(a), T))  # (n, T): a[j-1]
        real_b = a.gather(1, (j - 2).clamp(min=0).expand(len(a), T))  # a[j-2]: A's next
        random_b = other.gather(1, (j - cut - 2).clamp(min=0))  # other[j-cut-2]
        b = torch.where(not_next[:, None].bool(), random_b, real_b)  # (n, T)
        rows = torch.where((j >= cut + 2) & (j <= T - 2), b, self.tokens.sep)
        rows = torch.where((j >= 1) & (j <= cut), from_a, rows)
        rows[:, 0] = self.tokens.cls
        return rows

    def next_step(self, accum_steps: int) -> list[dict[str, torch.Tensor]]:
        n = self.micro_batch_size * accum_steps * self.world_size
        g, T = self.generator, self.block_size
        starts = torch.randint(int(self._cum_starts[-1]), (2, n), generator=g)  # A's, random B's
        cut = torch.randint(1, T - 3, (n,), generator=g)  # (n,) A's length
        not_next = torch.randint(2, (n,), generator=g)  # (n,)
        self.steps_drawn += 1
        a, other = (torch.from_numpy(self._windows(s.numpy())) for s in starts)  # (n, T+1)
        rows = self.pairs(a, other, cut, not_next)
        batches = []
        for micro in range(accum_steps):
            first = (micro * self.world_size + self.rank) * self.micro_batch_size
            part = slice(first, first + self.micro_batch_size)
            batches.append({"input_ids": rows[part], "nsp_label": not_next[part]})
        return batches
