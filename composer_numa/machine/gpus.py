"""Which GPUs this process sees, in the order CUDA/HIP numbers them.

Physical GPUs are counted in PCI bus order; ``CUDA_VISIBLE_DEVICES`` (or
``HIP_VISIBLE_DEVICES`` / ``ROCR_VISIBLE_DEVICES``) selects and reorders them.
On a live machine NVML resolves ``GPU-``/``MIG-`` UUIDs, and an already
initialised torch.cuda gives the exact ordinal -> PCI mapping.
``COMPOSER_NUMA_GPUS`` (PCI addresses) overrides everything.

On Grace Hopper / Grace Blackwell the driver hands each GPU's memory to the
kernel as a CPU-less NUMA node: :func:`memory_nodes` says which node is whose.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence

from composer_numa.diagnostics import GPU_UUID_UNRESOLVED, Diagnostic

__all__ = ["normalize_pci", "visible_order", "nvml_bus_ids_by_uuid", "torch_cuda_bus_ids", "memory_nodes",
           "nvml_memory_nodes"]

_PCI = re.compile(
    r"(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])"
)


def normalize_pci(address: str) -> str:
    """Normalise a PCI address to lowercase ``dddd:bb:dd.f``.

    nvidia-smi prints an 8-digit domain (``00000000:C1:00.0``), sysfs a 4-digit one.

    Raises:
        ValueError: the text is not a PCI address.
    """
    m = _PCI.fullmatch(address.strip())
    if m is None:
        raise ValueError(f"not a PCI address: {address!r} (expected dddd:bb:dd.f)")
    domain = int(m.group("domain") or "0", 16)
    return f"{domain:04x}:{int(m.group('bus'), 16):02x}:{int(m.group('dev'), 16):02x}.{m.group('fn')}"


def visible_order(
    physical: Sequence[str],
    env: Mapping[str, str],
    variables: Sequence[str],
    uuid_to_bus: Mapping[str, str] | None,
) -> tuple[list[str | None], list[Diagnostic]]:
    """Apply a visible-devices variable to the PCI-ordered list of physical GPUs.

    Args:
        physical: normalised PCI addresses in bus order.
        env: the environment.
        variables: the variables to honour, first set one wins.
        uuid_to_bus: NVML's UUID -> PCI address map, or None when NVML is unavailable.

    Returns:
        The PCI address of each visible ordinal (None where a UUID could not be
        resolved) and any warnings. Like CUDA, parsing stops at the first entry
        that names no device or repeats one.
    """
    value = next((env[v] for v in variables if v in env), None)
    if value is None:
        return list(physical), []
    out: list[str | None] = []
    diags: list[Diagnostic] = []
    seen: set[int] = set()
    for raw in value.split(","):
        item = raw.strip()
        if not item:
            break
        if item.isascii() and item.isdigit():
            digits = item.lstrip("0") or "0"
            i = int(digits) if len(digits) <= 6 else len(physical)
            if i >= len(physical) or i in seen:
                break  # CUDA stops at the first index that names no (new) device
            seen.add(i)
            out.append(physical[i])
        elif item.upper().startswith(("GPU-", "MIG-")):
            bus = None
            if uuid_to_bus is not None:
                bus = uuid_to_bus.get(item) or next(
                    (b for u, b in uuid_to_bus.items() if u.startswith(item)), None
                )
            if bus is None:
                diags.append(Diagnostic(
                    GPU_UUID_UNRESOLVED,
                    f"visible device {item[:48]!r} is a UUID that could not be resolved to a PCI "
                    "address (NVML unavailable or unknown UUID); its NUMA node is unknown",
                ))
            out.append(bus)
        else:
            break
    return out, diags


def nvml_bus_ids_by_uuid() -> dict[str, str] | None:
    """UUID (GPU and MIG) -> normalised PCI address from NVML; None when NVML is unusable."""
    try:
        import pynvml
    except Exception:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    out: dict[str, str] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            bus = normalize_pci(_text(pynvml.nvmlDeviceGetPciInfo(h).busId))
            out[_text(pynvml.nvmlDeviceGetUUID(h))] = bus
            try:
                n_mig = pynvml.nvmlDeviceGetMaxMigDeviceCount(h)
            except Exception:
                n_mig = 0
            for j in range(n_mig):
                try:
                    mh = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
                    out[_text(pynvml.nvmlDeviceGetUUID(mh))] = bus
                except Exception:
                    continue
    except Exception:
        return out or None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def memory_nodes(
    physical: Sequence[tuple[str, int | None]],
    cpu_less: Mapping[int, int | None],
    reported: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Which CPU-less memory node is each GPU's own memory (coherent GPUs: GH200, GB200).

    Args:
        physical: every physical GPU of the vendor as (PCI address, sysfs ``numa_node``),
            in PCI order: all of them, not only the visible ones, since the pairing below
            counts per CPU node.
        cpu_less: each CPU-less node that has memory -> its nearest CPU node (None when none).
        reported: PCI address -> node as the driver says (NVML's NUMA node id), when known.

    Returns:
        PCI address -> memory node, for the GPUs whose memory node is known. In order:
        what the driver reports (when that is one of ``cpu_less``); a GPU whose sysfs node is
        itself CPU-less memory; then, per CPU node, its GPUs in PCI order paired with the
        CPU-less memory nodes nearest to it in id order, only when the two counts are equal
        (one GH200: GPU 0009:01:00.0 with node 1; a GB200 tray: two GPUs and nodes 2 and 10
        per Grace). Anything ambiguous (a CXL expander beside a GPU, counts that differ) stays
        unknown rather than guessed.
    """
    out: dict[str, int] = {}
    taken: set[int] = set()
    for addr, node in (reported or {}).items():
        if node in cpu_less and node not in taken:
            out[addr] = node
            taken.add(node)
    for addr, node in physical:
        if addr not in out and node in cpu_less and node not in taken:
            out[addr] = node  # the firmware attached the device to its memory node
            taken.add(node)
    by_cpu: dict[int, tuple[list[str], list[int]]] = {}
    for addr, node in physical:
        if addr not in out and node is not None and node not in cpu_less:
            by_cpu.setdefault(node, ([], []))[0].append(addr)
    for mem, cpu in sorted(cpu_less.items()):
        if mem not in taken and cpu in by_cpu:
            by_cpu[cpu][1].append(mem)
    for addrs, mems in by_cpu.values():
        if addrs and len(addrs) == len(mems):
            out.update(zip(addrs, mems, strict=True))
    return out


def nvml_memory_nodes() -> dict[str, int] | None:
    """PCI address -> the NUMA node of the GPU's own memory, from NVML (``nvmlDeviceGetNumaNodeId``).

    Only coherent platforms answer; None when NVML is unusable or answers for no GPU.
    """
    try:
        import pynvml
    except Exception:
        return None
    query = getattr(pynvml, "nvmlDeviceGetNumaNodeId", None)
    if query is None:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    out: dict[str, int] = {}
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            try:
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                node = int(query(h))
                if node >= 0:
                    out[normalize_pci(_text(pynvml.nvmlDeviceGetPciInfo(h).busId))] = node
            except Exception:
                continue  # not supported on this GPU (discrete GPUs): nothing to report
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out or None


def torch_cuda_bus_ids() -> list[str] | None:
    """Ordinal -> PCI address from torch.cuda, only if the program already initialised it.

    Never imports torch and never initialises CUDA itself.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0")
        return out
    except Exception:
        return None


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
