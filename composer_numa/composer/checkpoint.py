"""Composer checkpoints that move between ``NumaAdamW`` and ``torch.optim.AdamW``.

Composer keeps a checkpoint's optimizer state under the optimizer's class name
(``state["optimizers"] = {"NumaAdamW": {...}}``) and, on load, looks it up under the class
name of the run's optimizer: resuming with the other class prints ``AdamW is not in the
state_dict. Its state will not be restored.`` and restarts the moments. The two optimizers'
state dicts are interchangeable (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``; groups with
the same keys), so only the name stands in the way. Two ways around it:

* the :class:`~composer_numa.composer.callback.NumaAffinity` callback renames the entry on
  load when the run's optimizer is the other one of the pair (:func:`install` at
  ``Event.BEFORE_LOAD``, :func:`uninstall` at ``Event.AFTER_LOAD``);
* ``composer-numa checkpoint convert IN OUT --to torch|numa`` rewrites a checkpoint file, for
  runs without the callback (:func:`convert_file`).

Going to torch drops ``master_param`` (the fp32 master weights ``NumaAdamW`` keeps for bf16
parameters; torch's AdamW has none and would carry them along unused), with one warning that
says how many. Other optimizers (``DecoupledAdamW`` scales weight decay differently) are not
converted: Composer's own warning then says that the state is not restored.

Nothing here imports torch or composer at module level: the command line uses it too.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from composer_numa.errors import ComposerNumaError

__all__ = ["CheckpointError", "FAMILY", "convert_optimizers", "remap_for", "install", "uninstall",
           "convert_file"]

log = logging.getLogger(__name__)

#: Optimizer class names whose Composer state interchanges, and the form each one is.
FAMILY = {"AdamW": "torch", "NumaAdamW": "numa"}
_NAME = {form: name for name, form in FAMILY.items()}
_ORIGINAL = "_composer_numa_original"


class CheckpointError(ComposerNumaError):
    """A checkpoint that cannot be converted, said in one line."""


def convert_optimizers(optimizers: Any, to: str) -> str | None:
    """Rename the AdamW-family entry of Composer's ``state["optimizers"]`` mapping, in place.

    Args:
        optimizers: ``{class name: optimizer state dict}`` as Composer saves it.
        to: ``"torch"`` (``AdamW``) or ``"numa"`` (``NumaAdamW``).

    Returns:
        The class name the state came from, or ``None`` when it already has the target name.

    Raises:
        CheckpointError: no entry, or several, of the family; a malformed entry.
    """
    if to not in _NAME:
        raise CheckpointError(f"the target must be 'torch' or 'numa', got {to!r}")
    if not isinstance(optimizers, dict):
        raise CheckpointError(f"the optimizer state is a {type(optimizers).__name__}, not Composer's "
                              "{class name: state dict} mapping")
    target = _NAME[to]
    if target in optimizers:
        return None
    found = [name for name in optimizers if name in FAMILY]
    if len(found) != 1:
        have = ", ".join(map(str, optimizers)) or "none"
        raise CheckpointError(f"expected the state of one of {', '.join(FAMILY)} to convert, found: {have}")
    source = found[0]
    osd = optimizers[source]
    if not isinstance(osd, dict) or not isinstance(osd.get("state"), dict) or "param_groups" not in osd:
        raise CheckpointError(f"the {source} entry is not an optimizer state dict (state, param_groups)")
    if to == "torch":
        dropped = 0
        for st in osd["state"].values():
            if isinstance(st, dict) and st.pop("master_param", None) is not None:
                dropped += 1
        if dropped:
            warnings.warn(f"NumaAdamW -> torch.optim.AdamW: dropped the fp32 master weights of {dropped} bf16 "
                          "parameter(s); torch's AdamW steps the bf16 parameters themselves", stacklevel=2)
    optimizers[target] = optimizers.pop(source)
    return source


def remap_for(optimizers: Iterable[Any], state: dict[str, Any]) -> None:
    """Before Composer loads ``state`` (a checkpoint's ``"state"`` dict) into ``optimizers``,
    rename a ``NumaAdamW`` entry to ``AdamW`` or the reverse when that is what the run uses."""
    saved = state.get("optimizers") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        return
    for optimizer in optimizers:
        name = type(optimizer).__qualname__
        if name not in FAMILY or name in saved or not any(k in FAMILY for k in saved):
            continue
        try:
            source = convert_optimizers(saved, FAMILY[name])
        except CheckpointError as e:
            warnings.warn(f"composer-numa: the checkpoint's optimizer state was not converted for {name}: {e}",
                          stacklevel=2)
            continue
        log.info("checkpoint: %s state loaded into %s", source, name)


def install(state: Any) -> None:
    """Make ``state.load_optim_state`` rename the optimizer entry first (see :func:`remap_for`).

    ``State.load_optim_state(state_dict, ...)`` is where Composer looks the optimizer state up by
    class name; the wrapper is an attribute of this one ``state`` object, removed by
    :func:`uninstall`."""
    current = getattr(state, "load_optim_state", None)
    if current is None or getattr(current, _ORIGINAL, None) is not None:
        return

    def load_optim_state(state_dict: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        remap_for(state.optimizers or (), state_dict)
        return current(state_dict, *args, **kwargs)

    setattr(load_optim_state, _ORIGINAL, current)
    state.load_optim_state = load_optim_state


def uninstall(state: Any) -> None:
    """Undo :func:`install`."""
    if getattr(state.__dict__.get("load_optim_state"), _ORIGINAL, None) is not None:
        del state.__dict__["load_optim_state"]


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str,
                 load: Callable[[str], Any] | None = None) -> str:
    """Rewrite a monolithic Composer checkpoint (one ``.pt`` file) for the other optimizer.

    Args:
        src: the checkpoint to read.
        dst: where to write the converted checkpoint (may equal ``src``).
        to: ``"torch"`` or ``"numa"``.
        load: reads a checkpoint (default: ``torch.load`` on the CPU; Composer checkpoints hold
            more than tensors, so only load files you trust).

    Returns:
        One line saying what was done.
    """
    import torch

    src, dst = os.fspath(src), os.fspath(dst)
    if to not in _NAME:
        raise CheckpointError(f"--to must be 'torch' or 'numa', got {to!r}")
    if os.path.isdir(src):
        raise CheckpointError(f"{src} is a directory (a sharded checkpoint); only single-file checkpoints "
                              "are converted")
    try:
        ckpt = load(src) if load is not None else torch.load(src, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no such file") from None
    except Exception as e:  # noqa: BLE001 - whatever the unpickler says, in one line
        raise CheckpointError(f"{src} is not a readable checkpoint: {type(e).__name__}: {e}") from None
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "optimizers" not in state:
        raise CheckpointError(f"{src} is not a Composer checkpoint with optimizer state (no state/optimizers)")
    source = convert_optimizers(state["optimizers"], to)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        raise CheckpointError(f"cannot write {dst}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if source is None:
        return f"{src} already holds {_NAME[to]} state; written unchanged to {dst}"
    count = len(state["optimizers"][_NAME[to]].get("state", {}))
    return f"{source} -> {_NAME[to]}: optimizer state of {count} parameter(s) written to {dst}"
