"""Counting the host's reads of tensor values, the calls that make it wait for a GPU, on a CPU.

On a GPU the host waits for every kernel queued so far whenever it needs a tensor's value: a
Python scalar (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``), a list or array (``.tolist()``,
``.numpy()``, ``.cpu()``), or an output whose shape depends on values (``nonzero`` without a size,
a boolean mask index, ``masked_select``, ``unique``, ``torch.equal``). :class:`HostReads` records
each of them, by the call site that asked for it (the innermost frame of gtl_dist, DeepSpeed,
torch.optim or the tests), so a test can pin exactly which reads a step makes. It sees the
operators through a ``TorchDispatchMode`` and the Python-level reads by patching
``Tensor.tolist``, ``Tensor.numpy`` and ``Tensor.cpu``, which on a CPU tensor dispatch nothing.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Operators whose result the host must wait for: a scalar, or an output sized by the values.
# (Under inference mode composite operators such as item and nonzero_numpy arrive undecomposed.)
WAITING_OPS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default,
               aten.nonzero.default, aten.nonzero_numpy.default, aten.argwhere.default,
               aten.masked_select.default, aten.equal.default, aten._unique2.default,
               aten.unique_consecutive.default, aten.unique_dim.default,
               aten.repeat_interleave.Tensor}
INDEXING_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                aten._index_put_impl_.default}
PYTHON_READS = ("tolist", "numpy", "cpu")
REPO = Path(__file__).resolve().parents[1]


def call_site() -> str:
    """``path:function`` of the innermost caller in gtl_dist, DeepSpeed, torch.optim or the tests."""
    frame = sys._getframe(2)
    while frame is not None:
        parts = Path(frame.f_code.co_filename).parts
        anchors = [i for i, part in enumerate(parts)
                   if part in ("gtl_dist", "deepspeed") or parts[i - 1:i + 1] == ("torch", "optim")
                   or Path(*parts[:i + 1]) == REPO / "tests"]
        if anchors:
            start = anchors[-1] - (parts[anchors[-1]] == "optim")
            return f"{'/'.join(parts[start:])}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class HostReads(TorchDispatchMode):
    """``with HostReads() as reads: ...`` then ``reads.sites``: call site -> number of reads."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()
        self._saved: dict[str, Callable] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if func in WAITING_OPS or (func in INDEXING_OPS and has_bool_index(args)):
            self.sites[call_site()] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> "HostReads":
        for name in PYTHON_READS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def read(tensor: torch.Tensor, *a: Any, _original: Callable = original, **kw: Any) -> Any:
                self.sites[call_site()] += 1
                return _original(tensor, *a, **kw)
            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    @property
    def total(self) -> int:
        return sum(self.sites.values())
