"""``NumaAdamW``: AdamW over flat, node-local buffers, stepped by pinned workers.

The optimizer step of a large model is memory-bandwidth bound. ``NumaAdamW``
keeps master weights, first and second moments in contiguous buffers bound to
the NUMA node(s) of the rank's CPUs (:mod:`composer_numa.offload.memory`) and updates
them in one fused pass per element (read grad, m, v, param; write param, m, v)
on workers pinned to that node's cores, with the GIL released.

Two modes, chosen from where the parameters live:

* **CPU-resident** parameters become views into the flat buffers, and so do
  their gradients: autograd accumulates in place, one step is one streaming
  pass over a few large arrays however many tensors the model has, and
  ``zero_grad`` zeroes the buffer in place.
* **GPU offload** (parameters on a CUDA device): master weights and states live
  in pinned node-local memory on the GPU's node; at ``step()`` gradients are
  copied device-to-host bucket by bucket on a side stream, each bucket is
  stepped on the CPU while the next one copies, and the updated parameters go
  back host-to-device on another stream.

Numerics follow ``torch.optim.AdamW`` operation by operation (decoupled weight
decay, ``lerp`` for the first moment, bias corrections computed in double):
fp32 results agree to about one ulp (torch's vectorised ``sqrt`` is not
correctly rounded; ours is), and the AVX-512, AVX2 and scalar paths and any
thread count give identical bits. bf16 parameters get fp32 master weights and
fp32 states by default (``master_weights``, ``state_dtype``).

Gradient semantics, CPU-resident mode: gradients stay views of the optimizer's
buffer. ``zero_grad(set_to_none=True)`` (the default) zeroes them in place and
keeps the tensors (``p.grad`` is a zero tensor, not ``None``), but remembers that
no gradient has arrived: a parameter that gets no gradient before the next
``step()`` is skipped exactly as torch skips ``grad=None`` (no decay, no moment
update, no step count). A gradient tensor that someone else put in ``p.grad``
(``model.zero_grad()`` followed by backward, or an explicit assignment) is
copied into the buffer at ``step()`` and replaced by the view. NaN or inf in a
gradient propagates into that element's moments and parameter, as with torch;
use a grad scaler's skip logic to avoid it.

Replaced parameters: assigning ``p.data`` (loading weights, swapping in EMA weights,
pruning) is noticed at the next ``step()``, ``zero_grad()`` or ``state_dict()``: the new
values are copied into the parameter's slot (and into its fp32 master weights unless the
values are unchanged, as after ``module.to``) and ``p.data`` points at the node-local buffer
again; moments and step count are kept, as torch keeps them. A replacement with a different
number of elements restarts that parameter's state with a warning (torch fails at the next
step). A tensor kept from the old ``p.data`` is a view of that buffer and sees the update.

Ctrl-C: the update and the step counts change as one transition. A SIGINT that arrives
during ``step()`` raises ``KeyboardInterrupt`` when the step is complete, so the state always
describes a whole number of steps.

Example:
    >>> import torch
    >>> from composer_numa import NumaAdamW
    >>> model = torch.nn.Linear(64, 64)
    >>> opt = NumaAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    >>> model(torch.randn(8, 64)).square().mean().backward()
    >>> opt.step()
    >>> opt.zero_grad()
"""

from __future__ import annotations

import logging
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from composer_numa.machine import gpus
from composer_numa.offload import memory, runtime
from composer_numa.offload.interrupts import deferred_sigint
from composer_numa.offload.native import native

__all__ = ["NumaAdamW", "fused_adamw_"]

log = logging.getLogger(__name__)

# Slot and chunk boundaries, in elements: one AVX-512 vector of fp32.
_ALIGN = 16
_GRAD = operator.attrgetter("grad")
_DATA_PTR = torch.Tensor.data_ptr
_NUMEL = torch.Tensor.numel
# torch's own loop comparing tensors' data pointers with a list (CUDA graph trees use it): a
# quarter of the cost of gathering the pointers in Python. Private, hence the fallback.
_PTRS_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)
_DTYPES = (torch.float32, torch.bfloat16)
# Group keys torch.optim.AdamW keeps, so state dicts interchange both ways.
_TORCH_GROUP_DEFAULTS = {
    "amsgrad": False,
    "foreach": None,
    "maximize": False,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}


def _check_hyper(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    lr = float(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in betas):
        raise ValueError(f"Invalid betas: {betas} (each must be in [0, 1))")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    maximize: bool = False,
    grad_scale: float = 1.0,
    master: torch.Tensor | None = None,
) -> None:
    """One fused AdamW update of contiguous CPU tensors, in place, GIL released.

    ``step`` is the step number after incrementing (1 for the first update), as
    in torch. With ``master`` (fp32), the update is computed on ``master`` and
    ``param`` (e.g. bf16) receives the rounded result.

    Args:
        param: float32 or bfloat16 parameter data.
        grad: float32 or bfloat16 gradient, same shape.
        exp_avg: first moment, float32 or bfloat16.
        exp_avg_sq: second moment, same dtype as ``exp_avg``.
        step: step count including this update (>= 1).
        lr: learning rate.
        betas: (beta1, beta2).
        eps: denominator epsilon.
        weight_decay: decoupled weight decay.
        maximize: ascend instead of descend.
        grad_scale: the gradient is multiplied by this first (unscaling, clipping).
        master: optional float32 master weights.

    Raises:
        TypeError: a non-tensor argument or an unsupported dtype.
        ValueError: shapes, devices, contiguity or hyper-parameters are wrong.
    """
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if master is not None:
        named["master"] = master
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} is on {t.device}; fused_adamw_ needs CPU tensors")
        if t.layout != torch.strided:
            raise ValueError(f"{name} has layout {t.layout}; fused_adamw_ needs dense tensors")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; expected torch.float32 or torch.bfloat16")
        if t.shape != param.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but param has {tuple(param.shape)}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) differ")
    if master is not None and master.dtype != torch.float32:
        raise TypeError(f"master must be float32, got {master.dtype}")
    if isinstance(step, bool) or not isinstance(step, int) or not 1 <= step < 2**63:
        raise ValueError(f"step must be an int from 1 to 2**63 - 1, got {step!r}")
    _check_hyper(lr, betas, eps, weight_decay)
    d = [t.detach().reshape(-1) for t in (param, grad, exp_avg, exp_avg_sq)]
    m = None if master is None else master.detach().reshape(-1)
    native().adamw_step(runtime.pool(), [(-1, d[0], d[1], d[2], d[3], m, float(lr), float(betas[0]),
                          float(betas[1]), float(eps), float(weight_decay), step,
                          float(grad_scale), bool(maximize))])


@dataclass(eq=False)
class _Buffer:
    """Flat storage of the parameters of one dtype on one node."""

    node: int
    param_dtype: torch.dtype
    numel: int
    param: torch.Tensor  # flat params (resident) or host param copy (offload)
    master: torch.Tensor | None
    grad: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


@dataclass(eq=False)
class _Slot:
    """Where one parameter lives in a buffer."""

    param: torch.Tensor
    group: int
    buffer: _Buffer
    offset: int
    numel: int
    grad: torch.Tensor  # buffer view shaped like the parameter
    host_param: torch.Tensor  # buffer view holding the updated value (offload: copied to device)


@dataclass(eq=False)
class _Unit:
    """Consecutive slots of one group in one buffer: one kernel job when all of
    them have gradients and the same step count; one bucket in offload mode."""

    buffer: _Buffer
    group: int
    first: int  # slot range in NumaAdamW._slots
    last: int
    start: int  # element range in the buffer
    end: int
    step: int | None = None  # common step count of the slots; None when they differ
    pending: set[int] = field(default_factory=set)  # offload: slots whose grads arrived
    prefetched: Any = None  # offload: copy handle launched during backward


class _SlotState(dict):
    """One parameter's state. Its tensors are views of the optimizer's buffers, so
    assigning a tensor to an existing key copies into the buffer instead of replacing
    it: code that "moves the optimizer state to the device" (Composer's Trainer does)
    leaves the state node-local and the kernels keep seeing it."""

    def __setitem__(self, key: str, value: Any) -> None:
        current = self.get(key)
        if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor) \
                and value is not current and value.numel() == current.numel():
            with torch.no_grad():
                current.copy_(value.reshape(current.shape))
            return
        super().__setitem__(key, value)


class _HostCopies:
    """Copy engine for offload with CPU stand-in "device" tensors: synchronous.

    It lets the bucket pipeline run (and be tested) on machines without a GPU.
    """

    def begin(self) -> None:
        pass

    def to_host(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        for dst, src in pairs:
            dst.copy_(src)
        return True  # a handle that is already complete

    def wait(self, handle: Any) -> None:
        pass

    def to_device(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dst, src in pairs:
            dst.copy_(src)

    def end(self) -> None:
        pass


class _CudaCopies(_HostCopies):
    """Gradients down on one side stream, parameters up on another; events order
    them against the compute stream and against the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.down = torch.cuda.Stream(device)
        self.up = torch.cuda.Stream(device)
        self.up_done: torch.cuda.Event | None = None

    def begin(self) -> None:
        if self.up_done is not None:  # host buffers are still being read by last step's uploads
            self.up_done.synchronize()
        self.up.wait_stream(torch.cuda.current_stream(self.device))

    def to_host(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
        self.down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.down):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                src.record_stream(self.down)
            event = torch.cuda.Event()
            event.record(self.down)
        return event

    def wait(self, handle: Any) -> None:
        if handle is not None:
            handle.synchronize()

    def to_device(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.up):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)

    def end(self) -> None:
        done = torch.cuda.Event()
        done.record(self.up)
        self.up_done = done
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.up)
        current.wait_stream(self.down)


def _remove_hooks(handles: list[Any]) -> None:
    """Remove gradient hooks from their parameters, emptying the list in place."""
    for h in handles:
        h.remove()
    handles.clear()


def _gpu_node(device: torch.device) -> int | None:
    """The NUMA node of a CUDA device, from the runtime's machine model (no second discovery):
    torch's PCI id of the ordinal when CUDA is initialised, else the model's own GPU order."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        model = runtime.machine().gpus
        bus_ids = gpus.torch_cuda_bus_ids()
        if bus_ids is not None and index < len(bus_ids):
            return next((g.numa_node for g in model if g.pci_bus_id == bus_ids[index]), None)
        return model[index].numa_node if index < len(model) else None
    except Exception as e:  # noqa: BLE001 - placement is an optimisation, never fatal
        log.warning("could not find the NUMA node of %s (%s); using the rank's node", device, e)
        return None


class NumaAdamW(Optimizer):
    """AdamW with node-local flat buffers and a fused, multi-threaded CPU step.

    A drop-in for ``torch.optim.AdamW`` (same hyper-parameters, per-group
    settings, ``lr`` read from ``param_groups`` at every step so schedulers
    work, interchangeable ``state_dict``), for CPU-resident parameters and for
    CUDA parameters with CPU offload of the optimizer state.

    Example:
        >>> import torch
        >>> from composer_numa import NumaAdamW
        >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(),
        ...                             torch.nn.Linear(32, 1))
        >>> opt = NumaAdamW([{"params": model[0].parameters(), "weight_decay": 0.0},
        ...                  {"params": model[2].parameters()}], lr=1e-3)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(16, 32)).square().mean().backward()
        ...     opt.step()

    Args:
        params: parameters or parameter groups (dicts), as for any optimizer.
        lr: learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        amsgrad: must be False (not implemented).
        maximize: maximise the objective.
        master_weights: keep fp32 master weights for bf16 parameters (default
            True); the bf16 parameters receive the rounded fp32 result.
        state_dtype: ``torch.float32`` (default) or ``torch.bfloat16`` moments.
        nodes: NUMA nodes to hold the buffers. Default: the nodes of the rank's
            CPUs (CPU-resident) or the GPU's node (offload). Parameters are
            split over several nodes in contiguous, balanced blocks, and each
            node's block is stepped by that node's workers.
        policy: memory policy of the buffers: ``bind`` (default) or ``preferred``.
        offload: force the offload pipeline (parameters stay where they are and
            are copied to and from host buffers). Default: True for CUDA
            parameters. With CPU parameters it runs the same bucket pipeline
            with synchronous copies (used by the tests).
        bucket_bytes: offload bucket size (gradient bytes per copy/step unit).
        copy_during_backward: offload only: start a bucket's device-to-host copy
            as soon as autograd has accumulated all of its gradients, instead
            of at ``step()``. Only correct when nothing changes gradients between
            backward and step (no clipping or unscaling on the device; pass
            such factors as ``step(grad_scale=...)`` instead).
        foreach: accepted for compatibility and ignored (the step is always fused).
        fused: accepted for compatibility and ignored.
        capturable: must be False.
        differentiable: must be False.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        nodes: int | list[int] | None = None,
        policy: str = "bind",
        offload: bool | None = None,
        bucket_bytes: int = 32 << 20,
        copy_during_backward: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("NumaAdamW does not implement amsgrad; use torch.optim.AdamW")
        if capturable or differentiable:
            raise ValueError("NumaAdamW supports neither capturable nor differentiable")
        if state_dtype not in _DTYPES:
            raise TypeError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        if policy not in ("bind", "preferred"):
            raise ValueError(f"policy must be 'bind' or 'preferred', got {policy!r}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
            **{**_TORCH_GROUP_DEFAULTS, "maximize": maximize, "foreach": foreach, "fused": fused},
        )
        self._master_weights = bool(master_weights)
        self._state_dtype = state_dtype
        self._nodes_arg = nodes
        self._policy = policy
        self._offload_arg = offload
        self._bucket_bytes = int(bucket_bytes)
        self._copy_during_backward = bool(copy_during_backward)
        self._built = False
        self._slots: list[_Slot] = []
        self._units: list[_Unit] = []
        self._buffers: list[_Buffer] = []
        self._hooks: list[Any] = []
        # Gradient hooks live on the parameters, which outlive the optimizer: remove them when it
        # goes (each construct/destroy cycle over one model used to leave its hooks behind).
        weakref.finalize(self, _remove_hooks, self._hooks).atexit = False
        self._steps = torch.zeros(0)
        super().__init__(params, defaults)
        self._build()

    # ------------------------------------------------------------ layout --

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; after construction this re-lays-out the buffers, keeping state."""
        super().add_param_group(param_group)
        if getattr(self, "_built", False):
            self._build()

    def _params_in_order(self) -> list[tuple[int, torch.Tensor]]:
        out = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.dtype not in _DTYPES:
                    raise TypeError(f"NumaAdamW supports float32 and bfloat16 parameters; "
                                    f"a parameter of shape {tuple(p.shape)} is {p.dtype}")
                if p.is_sparse or p.layout != torch.strided:
                    raise ValueError("NumaAdamW does not support sparse parameters")
                out.append((gi, p))
        devices = {p.device for _, p in out}
        if len(devices) > 1:
            raise ValueError(f"NumaAdamW needs all parameters on one device, got {sorted(map(str, devices))}")
        if devices and next(iter(devices)).type not in ("cpu", "cuda"):
            raise ValueError(f"NumaAdamW supports CPU and CUDA parameters, not {next(iter(devices))}")
        return out

    def _choose_nodes(self, device: torch.device | None) -> list[int]:
        if self._nodes_arg is not None:
            nodes = [self._nodes_arg] if isinstance(self._nodes_arg, int) else list(self._nodes_arg)
            if not nodes:
                raise ValueError("nodes must name at least one NUMA node")
            return nodes
        if device is not None and device.type == "cuda":
            node = _gpu_node(device)
            return [node if node is not None else memory.default_node()]
        mem = set(memory.memory_nodes())
        nodes = [n for n in runtime.pool().nodes() if n in mem]
        return nodes or [memory.default_node()]

    def _build(self) -> None:
        with deferred_sigint():  # a half-built layout would lose the state
            self._build_layout()

    def _build_layout(self) -> None:
        old, old_steps = {}, {}
        for i, s in enumerate(self._slots):
            if s.param.numel() != s.numel:  # p.data replaced by a tensor of another size
                warnings.warn(f"NumaAdamW: a parameter of {s.numel} elements now has {s.param.numel()} "
                              f"(shape {tuple(s.param.shape)}); its moments and step count restart from zero",
                              stacklevel=4)
                continue
            old[id(s.param)] = s
            old_steps[id(s.param)] = float(self._steps[i])
        _remove_hooks(self._hooks)
        params = self._params_in_order()
        device = params[0][1].device if params else None
        is_cuda = device is not None and device.type == "cuda"
        self._offload = is_cuda if self._offload_arg is None else bool(self._offload_arg)
        if is_cuda and not self._offload:
            raise ValueError("CUDA parameters need offload=True (or None): NumaAdamW steps on the CPU")
        self._device = device
        nodes = self._choose_nodes(device)
        self._copies = _CudaCopies(device) if is_cuda else _HostCopies()

        # Contiguous, balanced split of each dtype's parameters over the nodes.
        placed: list[tuple[int, torch.dtype, int, torch.Tensor]] = []  # (node, dtype, group, p)
        for dtype in _DTYPES:
            same = [(g, p) for g, p in params if p.dtype == dtype]
            total = sum(p.numel() for _, p in same) or 1
            seen = 0
            for g, p in same:
                k = min(len(nodes) - 1, seen * len(nodes) // total)
                placed.append((nodes[k], dtype, g, p))
                seen += p.numel()

        self._buffers, self._slots, self._units = [], [], []
        keys = sorted({(n, d) for n, d, _, _ in placed}, key=lambda k: (k[0], _DTYPES.index(k[1])))
        for node, dtype in keys:
            members = [(g, p) for n, d, g, p in placed if n == node and d == dtype]
            offsets, cursor = [], 0
            for _, p in members:
                offsets.append(cursor)
                cursor += -(-p.numel() // _ALIGN) * _ALIGN
            buf = self._allocate(node, dtype, cursor)
            self._buffers.append(buf)
            first = len(self._slots)
            for (g, p), off in zip(members, offsets, strict=True):
                n = p.numel()
                slot = _Slot(param=p, group=g, buffer=buf, offset=off, numel=n,
                             grad=buf.grad[off:off + n].view(p.shape),
                             host_param=buf.param[off:off + n].view(p.shape))
                self._place(slot, old.get(id(p)))
                self._slots.append(slot)
            self._units.extend(self._cut_units(buf, first, len(self._slots)))
        self._steps = torch.tensor([old_steps.get(id(s.param), 0.0) for s in self._slots],
                                   dtype=torch.float32)
        self._params = [s.param for s in self._slots]
        self._remember_storage()
        self._grad_views = [s.grad if s.param.requires_grad else None for s in self._slots]
        self._has_grad = bytearray(1 if s.param.grad is not None else 0 for s in self._slots)
        self._attach_state()
        self._install_hooks()
        for u in self._units:
            self._refresh_unit_step(u)
        self._built = True

    def _allocate(self, node: int, dtype: torch.dtype, numel: int) -> _Buffer:
        pin = self._offload and self._device is not None and self._device.type == "cuda"

        def alloc(dt: torch.dtype) -> torch.Tensor:
            return memory.empty(numel, dt, node=node, policy=self._policy, pin=pin)

        with_master = dtype != torch.float32 and self._master_weights
        total = numel * (2 * dtype.itemsize + 2 * self._state_dtype.itemsize + (4 if with_master else 0))
        # All of the node's buffers under one reservation: another rank allocating at the same
        # time gets them all or a MemoryError before any (never half of each and two errors).
        with memory.reserved(total, [node], self._policy):
            master = None
            if dtype == torch.float32:
                param = alloc(torch.float32)  # the fp32 parameters are their own master copy
            else:
                param = alloc(dtype)
                if with_master:
                    master = alloc(torch.float32)
            return _Buffer(node=node, param_dtype=dtype, numel=numel, param=param, master=master,
                           grad=alloc(dtype), exp_avg=alloc(self._state_dtype),
                           exp_avg_sq=alloc(self._state_dtype))

    def _place(self, slot: _Slot, old: _Slot | None) -> None:
        """Copy a parameter, and the state it had in an earlier layout, into its slot."""
        p, buf, off, n = slot.param, slot.buffer, slot.offset, slot.numel
        with torch.no_grad():
            slot.host_param.copy_(p.detach())
            if buf.master is not None:
                # The old master weights stay only while they still describe the parameter: same
                # values in new storage (module.to) keep them, new values (p.data = loaded) replace them.
                if old is not None and old.buffer.master is not None and \
                        old.host_param.dtype == slot.host_param.dtype and \
                        torch.equal(old.host_param.reshape(-1), slot.host_param.reshape(-1)):
                    buf.master[off:off + n].copy_(old.buffer.master[old.offset:old.offset + n])
                else:
                    buf.master[off:off + n].copy_(p.detach().reshape(-1))
            if old is not None:
                buf.exp_avg[off:off + n].copy_(old.buffer.exp_avg[old.offset:old.offset + n])
                buf.exp_avg_sq[off:off + n].copy_(old.buffer.exp_avg_sq[old.offset:old.offset + n])
            if not self._offload:
                p.data = slot.host_param  # the model now trains on node-local memory

    def _cut_units(self, buf: _Buffer, first: int, last: int) -> list[_Unit]:
        units: list[_Unit] = []
        limit = self._bucket_bytes // buf.grad.element_size() if self._offload else None
        k = first
        while k < last:
            g = self._slots[k].group
            j, size = k, 0
            while j < last and self._slots[j].group == g:
                size += self._slots[j].numel
                j += 1
                if limit is not None and size >= limit:
                    break
            start = self._slots[k].offset
            end = self._slots[j].offset if j < last else buf.numel
            units.append(_Unit(buffer=buf, group=g, first=k, last=j, start=start, end=end))
            k = j
        return units

    def _attach_state(self) -> None:
        """State views for every parameter and, when resident, gradient views."""
        self.state.clear()
        for i, s in enumerate(self._slots):
            buf, off, n, shape = s.buffer, s.offset, s.numel, s.param.shape
            st = _SlotState(
                step=self._steps[i],
                exp_avg=buf.exp_avg[off:off + n].view(shape),
                exp_avg_sq=buf.exp_avg_sq[off:off + n].view(shape),
            )
            if buf.master is not None:
                dict.__setitem__(st, "master_param", buf.master[off:off + n].view(shape))
            self.state[s.param] = st
            if self._offload or not s.param.requires_grad:
                continue
            # Attach the gradient view now, so the first backward already accumulates in place;
            # _has_grad still says whether a gradient has arrived.
            if s.param.grad is not None and s.param.grad is not s.grad:
                with torch.no_grad():
                    s.grad.copy_(s.param.grad)
            s.param.grad = s.grad

    def _install_hooks(self) -> None:
        has = self._has_grad
        unit_of = {}
        for u in self._units:
            for k in range(u.first, u.last):
                unit_of[k] = u
        for k, s in enumerate(self._slots):
            if not s.param.requires_grad:
                continue
            if self._offload and self._copy_during_backward:
                hook = self._make_prefetch_hook(k, unit_of[k])
            else:
                def hook(_p: torch.Tensor, k: int = k) -> None:
                    has[k] = 1
            self._hooks.append(s.param.register_post_accumulate_grad_hook(hook))

    def _make_prefetch_hook(self, k: int, unit: _Unit) -> Callable[[torch.Tensor], None]:
        has = self._has_grad
        expected = {j for j in range(unit.first, unit.last) if self._slots[j].param.requires_grad}
        owner = weakref.ref(self)  # the parameter holds the hook: it must not keep the optimizer alive

        def hook(_p: torch.Tensor) -> None:
            has[k] = 1
            unit.prefetched = None  # a later accumulation makes an earlier copy stale
            unit.pending.add(k)
            opt = owner()
            if unit.pending >= expected and opt is not None:
                unit.pending.clear()
                unit.prefetched = opt._copies.to_host(opt._download_pairs(unit))

        return hook

    def _remember_storage(self) -> None:
        self._data_ptrs = list(map(_DATA_PTR, self._params))
        self._numels = list(map(_NUMEL, self._params))
        self._indices = list(range(len(self._params)))

    def _storage_unchanged(self) -> bool:
        same = None
        if _PTRS_EQUAL is not None:
            try:
                same = _PTRS_EQUAL(self._params, self._data_ptrs, self._indices)
            except (TypeError, RuntimeError):  # a torch whose private helper changed
                same = None
        if same is None:
            same = list(map(_DATA_PTR, self._params)) == self._data_ptrs
        return bool(same) and list(map(_NUMEL, self._params)) == self._numels

    def _ensure_layout(self) -> None:
        """Re-adopt parameters whose storage changed since the last call, keeping their state:
        the Trainer moved the model to the GPU after the optimizer was built, weights were
        loaded, swapped (EMA) or pruned by assigning ``p.data``.

        Every parameter's data pointer and size are compared with what the optimizer last saw,
        in two C-level passes over the parameter list (no Python loop unless something changed):
        ~0.1 us per tensor, e.g. 15-20 us for a GPT-2's 148 tensors."""
        if not self._slots or self._storage_unchanged():
            return
        changed = [k for k, (p, ptr, n) in enumerate(zip(self._params, self._data_ptrs, self._numels, strict=True))
                   if p.data_ptr() != ptr or p.numel() != n]
        slots = [self._slots[k] for k in changed]
        if any(s.param.device != self._device or s.param.dtype != s.buffer.param_dtype
               or s.param.shape != s.grad.shape for s in slots):
            log.info("NumaAdamW: parameters changed device, dtype or shape; re-laying out the buffers")
            self._build()
            return
        with deferred_sigint():
            for s in slots:
                self._readopt(s)
            self._remember_storage()

    @torch.no_grad()
    def _readopt(self, s: _Slot) -> None:
        """Take the value a replaced ``p.data`` brought into the slot (same device, dtype, shape)."""
        value = s.param.detach()
        buf, off, n = s.buffer, s.offset, s.numel
        if buf.master is not None and not torch.equal(value.cpu() if self._offload else value, s.host_param):
            buf.master[off:off + n].copy_(value.reshape(-1))  # new values: new master weights
        s.host_param.copy_(value)
        if not self._offload:
            s.param.data = s.host_param  # back on node-local memory

    def _refresh_unit_step(self, u: _Unit) -> None:
        if u.first == u.last:
            u.step = 0
            return
        s = self._steps[u.first:u.last]
        lo, hi = float(s.min()), float(s.max())
        u.step = int(lo) if lo == hi else None

    # -------------------------------------------------------------- step --

    def _collect_grads(self) -> bool:
        """Mark which slots have a gradient; adopt gradients others put in p.grad.
        Returns True when every slot has one in place (the fast path)."""
        has = self._has_grad
        if self._offload:
            for k, s in enumerate(self._slots):
                has[k] = s.param.grad is not None
            return has.count(0) == 0
        # Fast path: every gradient arrived and is still our view (reading p.grad costs
        # ~0.2 us per parameter, so stop at the first that is not).
        if has.count(0) == 0 and all(map(operator.is_, map(_GRAD, self._params),
                                         self._grad_views)):
            return True
        grads = [s.param.grad for s in self._slots]
        for k, (g, s) in enumerate(zip(grads, self._slots, strict=True)):
            if g is None:
                has[k] = 0
            elif g is not s.grad:
                if g.is_sparse:
                    raise ValueError("NumaAdamW does not support sparse gradients")
                if g.shape != s.param.shape:
                    raise ValueError(f"gradient of shape {tuple(g.shape)} for a parameter of "
                                     f"shape {tuple(s.param.shape)}")
                with torch.no_grad():
                    s.grad.copy_(g)
                s.param.grad = s.grad
                has[k] = 1
        return has.count(0) == 0

    def _group_scalars(self, grad_scale: float) -> list[tuple]:
        out = []
        for group in self.param_groups:
            if group.get("amsgrad", False):
                raise ValueError("NumaAdamW does not implement amsgrad")
            lr = group["lr"]
            lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
            beta1, beta2 = (float(b.item() if isinstance(b, torch.Tensor) else b)
                            for b in group["betas"])
            _check_hyper(lr, (beta1, beta2), group["eps"], group["weight_decay"])
            out.append((lr, beta1, beta2, float(group["eps"]), float(group["weight_decay"]),
                        float(grad_scale), bool(group.get("maximize", False))))
        return out

    def _job(self, u: _Unit, start: int, end: int, step: int, hyper: tuple) -> tuple:
        b = u.buffer
        lr, beta1, beta2, eps, wd, scale, maximize = hyper
        return (b.node, b.param[start:end], b.grad[start:end], b.exp_avg[start:end],
                b.exp_avg_sq[start:end], None if b.master is None else b.master[start:end],
                lr, beta1, beta2, eps, wd, step, scale, maximize)

    def _unit_jobs(self, u: _Unit, all_have: bool, hypers: list[tuple]) -> tuple[list, list[int]]:
        """Kernel jobs for one unit and the slots they step."""
        hyper = hypers[u.group]
        if u.first == u.last:
            return [], []
        if all_have and u.step is not None:
            return [self._job(u, u.start, u.end, u.step + 1, hyper)], list(range(u.first, u.last))
        steps = self._steps[u.first:u.last].tolist()
        jobs, stepped = [], []
        run = None
        for k in range(u.first, u.last + 1):
            ok = k < u.last and self._has_grad[k]
            if run is not None and (not ok or steps[k - u.first] != steps[run - u.first]):
                s0 = self._slots[run].offset
                s1 = self._slots[k - 1].offset + self._slots[k - 1].numel
                jobs.append(self._job(u, s0, s1, int(steps[run - u.first]) + 1, hyper))
                run = None
            if ok:
                stepped.append(k)
                if run is None:
                    run = k
        return jobs, stepped

    def _advance(self, u: _Unit, stepped: list[int]) -> None:
        if not stepped:
            return
        if len(stepped) == u.last - u.first:
            self._steps[u.first:u.last] += 1
            if u.step is not None:
                u.step += 1
                return
        else:
            self._steps[torch.tensor(stepped)] += 1
        self._refresh_unit_step(u)

    def _download_pairs(self, u: _Unit) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pairs = []
        for k in range(u.first, u.last):
            g = self._slots[k].param.grad
            if g is not None:
                pairs.append((self._slots[k].grad, g))
        return pairs

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, *,
             grad_scale: float | None = None) -> float | None:
        """One AdamW update of every parameter that has a gradient.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scale: multiply gradients by this before the update (e.g. the
                inverse loss scale or a clipping coefficient); the gradient
                tensors themselves are not modified.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ensure_layout()
        hypers = self._group_scalars(1.0 if grad_scale is None else grad_scale)
        all_have = self._collect_grads()
        if not self._offload:
            jobs, advanced = [], []
            for u in self._units:
                j, stepped = self._unit_jobs(u, all_have, hypers)
                jobs.extend(j)
                advanced.append((u, stepped))
            with deferred_sigint():  # the update and its step count land together or not at all
                native().adamw_step(runtime.pool(), jobs)
                for u, stepped in advanced:
                    self._advance(u, stepped)
            return loss
        self._offload_step(all_have, hypers)
        return loss

    def _offload_step(self, all_have: bool, hypers: list[tuple]) -> None:
        copies = self._copies
        copies.begin()
        handles = []
        for u in self._units:  # queue every download now; they overlap the CPU work below
            h = u.prefetched if u.prefetched is not None else copies.to_host(self._download_pairs(u))
            handles.append(h)
            u.prefetched = None
            u.pending.clear()
        try:
            # every bucket's update, count and upload as one transition
            with deferred_sigint():
                for u, h in zip(self._units, handles, strict=True):
                    copies.wait(h)
                    jobs, stepped = self._unit_jobs(u, all_have, hypers)
                    native().adamw_step(runtime.pool(), jobs)
                    self._advance(u, stepped)
                    copies.to_device([(self._slots[k].param.detach(), self._slots[k].host_param)
                                      for k in stepped])
        finally:
            copies.end()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients.

        CPU-resident: the flat gradient buffer is zeroed in place by the node's
        workers and ``p.grad`` stays a view of it (also with ``set_to_none=True``,
        which instead marks the gradients as absent until autograd writes them,
        so unused parameters are skipped as with torch). Offload: the device
        gradients are handled as by ``torch.optim.Optimizer.zero_grad``.
        """
        self._ensure_layout()
        for u in self._units:
            u.pending.clear()
            u.prefetched = None
        if self._offload:
            super().zero_grad(set_to_none=set_to_none)
            return
        for b in self._buffers:
            memory.zero_(b.grad, b.node)
        if not all(map(operator.is_, map(_GRAD, self._params), self._grad_views)):
            for s in self._slots:  # someone replaced gradients: put the zeroed views back
                if s.param.grad is not s.grad and s.param.requires_grad:
                    s.param.grad = s.grad
        fill = 0 if set_to_none else 1
        self._has_grad[:] = bytes([fill]) * len(self._slots)

    # -------------------------------------------------------- state dict --

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.AdamW``'s format: per parameter ``step``, ``exp_avg``,
        ``exp_avg_sq`` (and ``master_param`` for bf16 parameters with master weights),
        as views of the node-local buffers (like torch, references, not copies)."""
        self._ensure_layout()
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from ``NumaAdamW`` or ``torch.optim.AdamW``.

        Hyper-parameters of each group are taken from the dict; moments and
        step counts are copied into the node-local buffers (converted to this
        optimizer's state dtype). Master weights come from ``master_param``
        when present, else from the current parameter values (see
        :meth:`sync_from_params`), so load the model's weights first.
        """
        self._ensure_layout()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = state_dict["param_groups"]
        saved = state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, "
                             f"this optimizer {len(self.param_groups)}")
        index_of: dict[int, Any] = {}
        for gi, (mine, theirs) in enumerate(zip(self.param_groups, groups, strict=True)):
            if len(mine["params"]) != len(theirs["params"]):
                raise ValueError(f"parameter group {gi} has {len(theirs['params'])} parameters in "
                                 f"the state dict but {len(mine['params'])} here")
            for p, key in zip(mine["params"], theirs["params"], strict=True):
                index_of[id(p)] = key
        for mine, theirs in zip(self.param_groups, groups, strict=True):
            if theirs.get("amsgrad", False):
                raise ValueError("the state dict uses amsgrad, which NumaAdamW does not implement")
            for k, v in theirs.items():
                if k != "params":
                    mine[k] = v
        with torch.no_grad():
            for i, s in enumerate(self._slots):
                key = index_of[id(s.param)]
                st = saved.get(key, saved.get(str(key)))
                buf, off, n = s.buffer, s.offset, s.numel
                if st is None:
                    buf.exp_avg[off:off + n].zero_()
                    buf.exp_avg_sq[off:off + n].zero_()
                    self._steps[i] = 0.0
                    self._sync_slot(s)
                    continue
                for name, dst in (("exp_avg", buf.exp_avg), ("exp_avg_sq", buf.exp_avg_sq)):
                    v = st[name]
                    if v.numel() != n:
                        raise ValueError(f"state {key!r}: {name} has {v.numel()} elements, the "
                                         f"parameter has {n}")
                    dst[off:off + n].copy_(v.detach().reshape(-1))
                step = st.get("step", 0)
                self._steps[i] = float(step.item() if isinstance(step, torch.Tensor) else step)
                src = st.get("master_param")
                if buf.master is not None and src is not None and src.dtype == torch.float32 \
                        and src.numel() == n:
                    buf.master[off:off + n].copy_(src.detach().reshape(-1))
                else:
                    self._sync_slot(s)
        for u in self._units:
            self._refresh_unit_step(u)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    @torch.no_grad()
    def sync_from_params(self) -> None:
        """Re-read the parameters into the optimizer's copies: the fp32 master weights
        and, in offload mode, the host copy of every parameter.

        Call it after changing parameter values outside the optimizer (loading model
        weights without optimizer state, re-initialising a layer): the next step
        otherwise starts from the optimizer's own, older copy. ``load_state_dict``
        does it for every parameter whose state carries no master weights.
        """
        for s in self._slots:
            self._sync_slot(s)

    def _sync_slot(self, s: _Slot) -> None:
        with torch.no_grad():
            if self._offload:
                s.host_param.copy_(s.param.detach())
            if s.buffer.master is not None:
                s.buffer.master[s.offset:s.offset + s.numel].copy_(s.param.detach().reshape(-1))

    # ----------------------------------------------------------- report --

    def placement(self) -> list[dict[str, Any]]:
        """Per buffer: node, parameter dtype, elements, bytes and pages per node."""
        out = []
        for b in self._buffers:
            tensors = [t for t in (b.param, b.master, b.grad, b.exp_avg, b.exp_avg_sq)
                       if t is not None]
            pages: dict[int, int] = {}
            for t in tensors:
                for node, count in memory.nodes_of(t).items():
                    pages[node] = pages.get(node, 0) + count
            out.append({"node": b.node, "dtype": str(b.param_dtype).replace("torch.", ""),
                        "elements": b.numel,
                        "bytes": sum(t.numel() * t.element_size() for t in tensors),
                        "pages_per_node": pages})
        return out

    def __repr__(self) -> str:
        mode = "offload" if getattr(self, "_offload", False) else "resident"
        nodes = sorted({b.node for b in getattr(self, "_buffers", [])})
        return f"NumaAdamW({mode}, nodes={nodes}, groups={len(self.param_groups)})"

