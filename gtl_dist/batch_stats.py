"""The statistics a loss reports for one batch, kept on the device until someone reads them.

Every loss returns ``(loss, stats)``. Reading a statistic to the host makes it wait for every
kernel queued before, so ``stats`` is a :class:`BatchStats`: a read-only mapping of names to
floats whose values stay in one float64 device tensor until a key is first read, and then are all
read at once. The training loop never reads them per step: it adds :attr:`BatchStats.tensor` to
its running sums on the device and reads those at log intervals (gtl_dist/train/loop.py).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Optional, Sequence

import torch


class BatchStats(Mapping[str, float]):
    """Named float statistics of one batch, as one float64 tensor [len(names)] on the device."""

    def __init__(self, names: Sequence[str], values: Sequence[torch.Tensor] | torch.Tensor):
        # float64 holds every float32 (and bf16) statistic exactly, and sums them as Python does.
        self.names = tuple(names)
        self.tensor = (values.detach().double() if isinstance(values, torch.Tensor)
                       else torch.stack([v.detach().double() for v in values]))
        if self.tensor.shape != (len(self.names),):
            raise ValueError(f"BatchStats: {len(self.names)} names {self.names} for values of shape "
                             f"{tuple(self.tensor.shape)}")
        self._floats: Optional[dict[str, float]] = None

    def __getitem__(self, key: str) -> float:
        if self._floats is None:  # the one host read
            self._floats = dict(zip(self.names, self.tensor.tolist()))
        return self._floats[key]

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"BatchStats({dict(self)})"
