"""An exponential moving average of the weights (Polyak averaging), for train.ema_decay > 0.

The Trainer evaluates and saves the average, and trains the weights themselves: averaging
the last few hundred steps' weights smooths out the noise of each step's update, which is
worth as much as a lower learning rate without slowing learning (on the default job, ~0.02
nats per character at equal steps; BENCHMARKS.md). The decay warms up as
min(decay, t / (t + 9)) after t updates (timm's ModelEmaV2 and TensorFlow's
ExponentialMovingAverage with num_updates), so the first steps' random weights fade at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class WeightAverage:
    """The average of `named_params` (a model's trainable parameters, by name), kept in their
    dtype on their device. Plain tensors only: the Trainer refuses sharded parameters."""

    def __init__(self, named_params: list[tuple[str, torch.Tensor]], decay: float):
        self.names = [name for name, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]

    def decay_at(self, updates: int) -> float:
        """The decay of the `updates`-th update (1 for the first)."""
        return min(self.decay, updates / (updates + 9))

    @torch.no_grad()
    def update(self, updates: int) -> None:
        """Fold the current weights in: average <- d * average + (1 - d) * weights."""
        weights = [p.detach() for p in self.params]
        torch._foreach_lerp_(self.average, weights, 1 - self.decay_at(updates))

    @contextmanager
    def swapped_in(self, trained: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
        """The parameters hold the average inside the block and the trained weights again
        after it: `trained`, a trained_weights() copy the caller already made, or a new one."""
        trained = self.trained_weights() if trained is None else trained
        self.install()
        try:
            yield
        finally:
            self._put(trained)

    def install(self) -> None:
        """Put the average into the parameters for good (the end of training)."""
        self._put(dict(zip(self.names, self.average)))

    @torch.no_grad()
    def _put(self, weights: dict[str, torch.Tensor]) -> None:
        for p, name in zip(self.params, self.names):
            p.copy_(weights[name])

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """A copy of the weights as trained, by name: what resume needs besides the average
        (which the checkpoint's weights file holds)."""
        return {name: p.detach().clone() for name, p in zip(self.names, self.params)}

    def resume(self, trained: dict[str, torch.Tensor]) -> None:
        """After a checkpoint's weights (the average) were loaded into the parameters: take
        them as the average, and put the trained weights back into the parameters."""
        self.average = [p.detach().clone() for p in self.params]
        self._put(trained)
