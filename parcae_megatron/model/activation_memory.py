"""Device-independent activation memory: bytes kept for the backward pass by a forward.

``SavedTensorMeter`` records, while a forward runs, every tensor autograd saves for backward
(``torch.autograd.graph.saved_tensors_hooks``) and every tensor a non-reentrant checkpoint
keeps as its input (``torch.utils.checkpoint.checkpoint`` keeps its arguments alive instead of
saving them through the hooks: the loop state at iteration boundaries). Storages are counted
once (views and repeated saves share them) and parameters are left out: what remains is the
activation memory of the forward, the same on CPU and GPU for the same shapes and dtypes.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint


class SavedTensorMeter:
    """Context manager: ``with SavedTensorMeter(model) as meter: loss = model(...)``, then
    ``meter.bytes``. Tensors saved inside a non-reentrant checkpoint are not counted (the
    checkpoint drops them and recomputes them in the backward)."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        self._skip = {self._key(p) for p in model.parameters()} if model is not None else set()
        self._storages: dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._checkpoint = None

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        storage = t.untyped_storage()
        return (t.device.type, t.device.index, storage.data_ptr())

    def _record(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = self._key(t)
        if key not in self._skip:
            self._storages[key] = max(self._storages.get(key, 0), t.untyped_storage().nbytes())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self._record(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def _record_checkpoint_inputs(self, function, *args, **kwargs):
        for arg in (*args, *kwargs.values()):
            for item in (arg if isinstance(arg, (tuple, list)) else (arg,)):
                self._record(item)
        return self._checkpoint(function, *args, **kwargs)

    @property
    def bytes(self) -> int:
        """Bytes of distinct non-parameter storages kept for backward."""
        return sum(self._storages.values())

    def __enter__(self) -> SavedTensorMeter:
        self._checkpoint = torch.utils.checkpoint.checkpoint
        torch.utils.checkpoint.checkpoint = self._record_checkpoint_inputs
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        torch.utils.checkpoint.checkpoint = self._checkpoint
