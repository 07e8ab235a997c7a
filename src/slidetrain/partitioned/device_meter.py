"""An independent measure of the device bytes the offload engine allocates, to check its ledger.

`DeviceMeter` is a TorchDispatchMode: it sees the output of every aten op, and counts the
storage of each output that is new (not the storage of one of the op's inputs: views and
in-place ops allocate nothing) and lives on the engine's device, when the op runs inside the
engine's `device_scope()`. A weakref finalizer on the storage takes its bytes off when it is
freed, so `live` is what is allocated now and `peak` its maximum. The count uses none of the
engine's bookkeeping: only where device work starts and ends, and what a scope hands over as
parameter gradients (model state from then on, no longer counted; `handed_over_alive` lets a
test check that each of them is indeed a parameter's .grad or gone). Against the ledger it
keeps one comparison, moment by moment: `max_unaccounted`, the most bytes alive that the ledger
did not hold at the same time (a peak-to-peak comparison misses an omission outside the peak).

Limits (why this is a check of the ledger, not a replacement for max_memory_allocated):
- it sees op outputs only: a kernel's internal workspace (oneDNN reorders, im2col columns,
  cuDNN workspaces, reduction scratch) is invisible, as are allocator rounding and caching;
- on CPU the "device" is host RAM, so only tensors created inside a device scope count: a host
  buffer the engine allocated inside one would be counted as device bytes (an over-count);
- tensors created outside every scope (the caller's, the on-device rest of the network) are not
  the engine's and are not counted; one created inside and kept past the scope stays counted.
The CUDA check (`torch.cuda.max_memory_allocated` under `set_per_process_memory_fraction`, in
the GPU script) measures what this cannot.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from slidetrain.partitioned.offload_engine import DeviceScope, OffloadEngine


def _storages(tree) -> list[torch.UntypedStorage]:
    leaves, _ = tree_flatten(tree)
    return [t.untyped_storage() for t in leaves if isinstance(t, torch.Tensor)]


class DeviceMeter(TorchDispatchMode):
    """Live and peak bytes of the storages created inside `engine`'s device scopes (see module doc).

    Use as a context manager around the engine's work; the engine calls it back as each scope ends.
    """

    def __init__(self, engine: OffloadEngine) -> None:
        super().__init__()
        self.engine = engine
        self.live = 0
        self.peak = 0
        # storage key (its StorageImpl's address, stable across Python wrappers) -> finalizer
        self._counted: dict[int, weakref.finalize] = {}
        self._handed_over: list[weakref.ref] = []
        # the most bytes alive beyond what the ledger held at the same moment, and the op it was
        # seen before: sampled as each op starts, when the previous statement's tensors are held
        # (an allocation is added to the ledger only after the op that makes it returns)
        self.max_unaccounted = 0
        self.max_unaccounted_at = ""

    def __enter__(self):
        self.engine.scope_exit_hooks.append(self._scope_ended)
        return super().__enter__()

    def __exit__(self, *exc):
        self.engine.scope_exit_hooks.remove(self._scope_ended)
        return super().__exit__(*exc)

    def reset_peak(self) -> None:
        self.peak = self.live

    def handed_over_alive(self) -> list[torch.UntypedStorage]:
        """Storages handed over as parameter gradients that are still alive."""
        return [s for ref in self._handed_over if (s := ref()) is not None]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.engine.scope is not None and self.live - self.engine.ledger.current > self.max_unaccounted:
            self.max_unaccounted = self.live - self.engine.ledger.current
            self.max_unaccounted_at = str(func)
        out = func(*args, **(kwargs or {}))
        if self.engine.scope is not None:
            inputs = {s._cdata for s in _storages((args, kwargs))}
            for storage in _storages(out):
                key = storage._cdata
                if key in inputs or key in self._counted or not self._on_device(storage):
                    continue
                n = storage.nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                self._counted[key] = weakref.finalize(storage, self._freed, key, n)
        return out

    def _on_device(self, storage: torch.UntypedStorage) -> bool:
        want = self.engine.device  # "cuda" (no index) means the current CUDA device
        return storage.device.type == want.type and want.index in (None, storage.device.index)

    def _freed(self, key: int, n: int) -> None:
        self._counted.pop(key, None)
        self.live -= n

    def _scope_ended(self, scope: DeviceScope) -> None:
        for t in scope.handed_over:  # model state from now on (a parameter's .grad)
            storage = t.untyped_storage()
            fin = self._counted.pop(storage._cdata, None)
            if fin is not None and fin.detach() is not None:
                self.live -= storage.nbytes()
            self._handed_over.append(weakref.ref(storage))
