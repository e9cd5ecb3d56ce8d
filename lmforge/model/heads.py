"""Heads that read a decoder's hidden states instead of its vocabulary logits: sequence
classification here (reward and value heads are the same shape), pooled on the last real
token, the only one that has seen the whole text under causal attention, or averaged over
every real token (`pooling="mean"`: each answer token's evidence counts alike, which served
reward models better in BENCHMARKS.md). A bidirectional model (model.causal=false,
pretrained with train.objective=mlm) sees the whole text at every position, so the same
pooling serves it: its checkpoints fine-tune with `lmforge classify`."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.config import check_pooling
from lmforge.model.gpt import GPT
from lmforge.model.linear import Linear


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor:
    """(B,) index of each row's last real token, for left or right padding (mask (B, T), 1 on
    real tokens); the last position when there is no mask."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long)
    positions = torch.arange(1, length + 1, device=attention_mask.device)  # (T,)
    return (attention_mask.long() * positions).argmax(dim=-1)  # the largest real position


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(B, T, d) final hidden states -> (B, d): the last real token's, or the mean over the
    real tokens (every position's evidence counts alike, as in a bag of words, while each
    state still carries its context)."""
    B, T, _ = hidden.shape
    if pooling == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    last = last_token_index(attention_mask, B, T).to(hidden.device)  # (B,)
    return hidden[torch.arange(B, device=hidden.device), last]


class SequenceClassifier(nn.Module):
    """A backbone (a GPT, or a PEFT module around one) + a linear head on the pooled final
    hidden states (the last real token's, or their mean) -> (B, n_labels) logits."""

    def __init__(self, backbone: nn.Module, labels: list[str], pooling: str = "last"):
        super().__init__()
        check_pooling("pooling", pooling)
        self.backbone = backbone
        self.labels = list(labels)
        self.pooling = pooling
        self.config = backbone.config
        self.head = Linear(self.config.d_model, len(self.labels))
        nn.init.normal_(self.head.weight, std=self.config.init_std)
        nn.init.zeros_(self.head.bias)
        self.tokenizer = None  # set by lmforge.load, for predict()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.backbone(
            input_ids, attention_mask=attention_mask, return_hidden=True
        )  # (B, T, d)
        return self.head(pool(hidden, attention_mask, self.pooling))  # (B, C)

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 32) -> list[str]:
        """The most likely label of each text (needs the tokenizer lmforge.load attaches)."""
        from lmforge.data.classify import encode_text

        ids = [encode_text(self._tokenizer(), t, self.config.block_size) for t in texts]
        if not ids:
            return []
        return [self.labels[j] for j in self.outputs(ids, batch_size).argmax(-1).tolist()]

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError(
                f"no tokenizer attached: load the {type(self).__name__} with lmforge.load"
            )
        return self.tokenizer

    @torch.no_grad()
    def outputs(self, ids: list[list[int]], batch_size: int) -> torch.Tensor:
        """forward over non-empty token id lists, batch_size at a time, padded, in eval mode:
        (N, C) logits, or (N,) rewards."""
        from lmforge.data.classify import pad_batch

        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(ids), batch_size):
            chunk = ids[i : i + batch_size]
            batch = pad_batch(chunk, [0] * len(chunk), self.tokenizer.pad_id or 0)
            out.append(self(batch["input_ids"], batch["attention_mask"]))
        self.train(was_training)
        return torch.cat(out)


class RewardModel(SequenceClassifier):
    """A scalar head on the pooled hidden states: forward -> (B,) rewards. Trained with the
    Bradley-Terry loss on preference pairs (`lmforge reward`); `score` rates answers."""

    def __init__(self, backbone: nn.Module, pooling: str = "last"):
        super().__init__(backbone, ["reward"], pooling)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return super().forward(input_ids, attention_mask)[:, 0]  # (B,)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
        """The reward of each (user prompt, assistant response) in the chat format (needs the
        tokenizer lmforge.load attaches)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_conversations(
            [
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                for p, r in zip(prompts, responses)
            ],
            batch_size,
        )

    @torch.no_grad()
    def score_conversations(
        self, conversations: list[list[dict]], batch_size: int = 32
    ) -> list[float]:
        """The reward of each chat conversation ending with the assistant's answer."""
        from lmforge.data.sft import to_example

        tokenizer, block = self._tokenizer(), self.config.block_size
        # as in training: the conversation's inputs, the answer's last token last
        ids = [to_example(tokenizer, c).input_ids[-block:] for c in conversations]
        return self.outputs(ids, batch_size).tolist() if ids else []


class ActorCritic(nn.Module):
    """A policy (a GPT, or a PEFT module around one) with a value head on its final hidden
    states, for PPO: forward -> (logits (B, T, V), values (B, T)) from one pass of the
    backbone. The value head starts at zero, so the first values are 0. Checkpoints keep the
    policy as a plain language model (lmforge.load gives the policy) and the value head
    beside it for resume (lmforge/train/checkpoint.py)."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.config = policy.config
        self.value_head = Linear(self.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.policy(
            input_ids, attention_mask=attention_mask, return_hidden=True
        )  # (B, T, d)
        gpt = next(m for m in self.policy.modules() if isinstance(m, GPT))
        return gpt.logits(hidden), self.value_head(hidden)[..., 0]
