"""Which items each training step sees: one sharded index stream per task (`TaskStream`) and the seeded choice of
each step's task from the task weights (`MultiTaskSampler`). Both save their state in checkpoints, so a resumed run
continues with the very next batch, on every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from training.data.datasets import TASKS

if TYPE_CHECKING:
    from training.data.datasets import ShapesData


class TaskStream:
    """Epoch-based sharded index stream for one task (DistributedSampler semantics without a DataLoader):
    each epoch a seeded permutation, rank r takes every world-th index. Its (epoch, offset) state is saved in
    checkpoints so a resumed run continues with the very next batch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        per_rank = int(np.ceil(self.size / self.world))
        perm = np.resize(perm, per_rank * self.world)  # pad by wrapping, as DistributedSampler does
        return perm[self.rank :: self.world]

    def next_batch(self) -> list[int]:
        if self.offset + self.batch_size > len(self._order):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        batch = self._order[self.offset : self.offset + self.batch_size].tolist()
        self.offset += self.batch_size
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


class MultiTaskSampler:
    """Chooses the task of each step from weights, identically on every rank (seeded by step)."""

    def __init__(self, data: ShapesData, weights: dict[str, float], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, batch_sizes: dict[str, int] | None = None) -> None:
        """batch_size: items per batch; batch_sizes: per-task exceptions (e.g. fewer `refer_image` images, each
        bringing several expressions)."""
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; known: {TASKS}")
        self.tasks = [t for t, w in weights.items() if w > 0 and data.size(t) > 0]
        if not self.tasks:
            raise ValueError("no task has both a positive weight and data")
        w = np.array([weights[t] for t in self.tasks], dtype=np.float64)
        self.probs = w / w.sum()
        self.seed, self.rank = seed, rank
        sizes = {t: int((batch_sizes or {}).get(t, batch_size)) for t in self.tasks}
        self.streams = {t: TaskStream(data.size(t), sizes[t], seed + k, rank, world)
                        for k, t in enumerate(self.tasks)}

    def draw(self, step: int) -> tuple[str, list[int], np.random.Generator]:
        choice = np.random.default_rng([self.seed, step]).choice(len(self.tasks), p=self.probs)
        task = self.tasks[int(choice)]
        return task, self.streams[task].next_batch(), np.random.default_rng([self.seed, step, self.rank])

    def state(self) -> dict:
        return {t: s.state() for t, s in self.streams.items()}

    def load_state(self, state: dict) -> None:
        for t, s in state.items():
            if t in self.streams:
                self.streams[t].load_state(s)
