"""What the training stages share: the training stream in batches, the optimiser step,
where the model is."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tokengine.data.synthetic import train_sample
from tokengine.models.tiny import IMAGE_SIZE

VAL_STREAM_OFFSET = 7919  # validation uses train_stream(seed + this): disjoint from training
STATE_FILE = "train_state.pt"  # stage c's resume state, in the output directory
LOG_FILE = "training.json"  # the run's summary, beside the model


def model_device(module: nn.Module) -> torch.device:
    """Where ``module``'s parameters are (training moves the whole model with ``--device``)."""
    return next(module.parameters()).device


def segment_mean(rows: torch.Tensor, segment: torch.Tensor, count: int) -> torch.Tensor:
    """(count, D): the mean of the rows (R, D) with each segment index (R,); zero if none."""
    sums = rows.new_zeros(count, rows.shape[-1]).index_add_(0, segment, rows)
    return sums / torch.bincount(segment, minlength=count).clamp_min(1)[:, None]


class StreamBatches(Dataset):
    """Batch ``i``: samples ``start + i * size`` up to (not including) ``stop`` of
    ``train_stream(seed)`` at the model's image size, as ``prepare`` returns them.

    Each batch depends on its index alone, so a DataLoader's workers make them in parallel
    (``--workers``, for a GPU's appetite) and in order: the same batches as one process.
    """

    def __init__(self, seed: int, start: int, stop: int, size: int, prepare: Callable) -> None:
        self.seed, self.start, self.stop, self.size, self.prepare = seed, start, stop, size, prepare

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.size)

    def __getitem__(self, i: int):
        lo = self.start + i * self.size
        hi = min(lo + self.size, self.stop)
        return self.prepare([train_sample(self.seed, k, IMAGE_SIZE) for k in range(lo, hi)])


def stream_batches(seed: int, start: int, stop: int, size: int, prepare: Callable,
                   workers: int) -> DataLoader:  # fmt: skip
    """The batches of :class:`StreamBatches` in order, made by ``workers`` processes (0: here)."""
    data = StreamBatches(seed, start, stop, size, prepare)
    # its own generator: a DataLoader draws a worker seed, which would shift the global RNG
    return DataLoader(data, batch_size=None, num_workers=workers, generator=torch.Generator(),
                      prefetch_factor=4 if workers else None)  # fmt: skip


def optimizer_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor) -> float:
    """Backward, clip the gradient norm to 1 and step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item()
