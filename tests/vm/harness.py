"""QEMU test rig: boot a stock Debian kernel with a chosen NUMA layout and run commands in it.

The host machines (developers', CI's) have one NUMA node, so nothing there proves
that pages land where a binding says. A guest does: QEMU (TCG, no KVM needed)
boots Debian's ``linux-image-amd64`` with ``-numa`` nodes, distances and PCI
devices placed on chosen nodes. The guest's init (busybox, in an initramfs built
here) mounts the host's ``/`` read-only over virtio-9p, puts a tmpfs overlay on
top, and ``chroot``s into it, so the guest runs the host's own Python with the
editable-installed ``composer_numa``. Commands go in and results come out
through a second, writable 9p share; the serial console is kept for diagnosis.

The kernel package is downloaded (``apt-get download``) and unpacked
(``dpkg -x``) into ``tests/vm/.cache`` on first use; nothing is installed.
Environment:

* ``COMPOSER_NUMA_VM=0`` turns the VM tests off.
* ``COMPOSER_NUMA_VM_KERNEL=/path/to/vmlinuz`` and ``COMPOSER_NUMA_VM_MODULES=/lib/modules/VER``
  use a kernel you already have instead of fetching Debian's.
* ``COMPOSER_NUMA_VM_CACHE=DIR`` moves the cache.
* ``COMPOSER_NUMA_VM_KEEP=1`` keeps each boot's I/O directory (console log, outputs).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Layout",
    "NodeSpec",
    "VmResult",
    "VmUnavailable",
    "VmError",
    "LAYOUTS",
    "TWO_NODES",
    "TWO_NODES_LAUNCH",
    "SNC",
    "CPULESS",
    "SMALL_NODE",
    "NPS4",
    "REPO",
    "unavailable_reason",
    "ensure_kernel",
    "run_in_vm",
    "run_pytest_in_vm",
    "CheckResult",
    "run_checks_in_vm",
]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
QEMU = "qemu-system-x86_64"
# Modules the guest needs for the shares; their dependencies are resolved from the kernel.
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")


class VmUnavailable(Exception):
    """The rig cannot run here (no qemu, no kernel, no 9p): tests skip with this reason."""


class VmError(Exception):
    """The guest booted wrongly (init failed, time-out); carries the console tail."""


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class NodeSpec:
    """One guest NUMA node.

    Attributes:
        memory_mib: RAM of the node.
        cpus: logical CPUs on it (empty: a CPU-less memory node).
    """

    memory_mib: int
    cpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Layout:
    """A guest machine: nodes, SLIT distances, sockets, and GPU stand-ins per node.

    CPU ``i`` sits in socket ``i // (ncpus // sockets)``. Each entry of ``gpus`` is the
    node of one PCI display device (``bochs-display``, class 0x0380) behind its own
    ``pxb-pcie`` expander with that ``numa_node``; :attr:`gpu_addresses` are their PCI
    addresses in the guest, to be named in ``COMPOSER_NUMA_GPUS``.
    """

    name: str
    nodes: tuple[NodeSpec, ...]
    distances: tuple[tuple[int, ...], ...]
    sockets: int = 1
    gpus: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        n = len(self.nodes)
        if len(self.distances) != n or any(len(r) != n for r in self.distances):
            raise ValueError(f"{self.name}: distance matrix must be {n}x{n}")
        cpus = sorted(c for node in self.nodes for c in node.cpus)
        if cpus != list(range(len(cpus))) or not cpus:
            raise ValueError(f"{self.name}: CPUs must be 0..N-1, each on one node")
        if len(cpus) % self.sockets:
            raise ValueError(f"{self.name}: {len(cpus)} CPUs do not split into {self.sockets} sockets")
        if any(g < 0 or g >= n for g in self.gpus):
            raise ValueError(f"{self.name}: a GPU names a node that does not exist")

    @property
    def ncpus(self) -> int:
        return sum(len(n.cpus) for n in self.nodes)

    @property
    def memory_mib(self) -> int:
        return sum(n.memory_mib for n in self.nodes)

    def socket_of(self, cpu: int) -> int:
        return cpu // (self.ncpus // self.sockets)

    def node_of(self, cpu: int) -> int:
        return next(i for i, n in enumerate(self.nodes) if cpu in n.cpus)

    def _bus_nr(self, i: int) -> int:
        return 0x20 * (i + 1)

    @property
    def gpu_addresses(self) -> tuple[str, ...]:
        # the expander's root port is bus_nr:00.0; the device sits on the next bus.
        return tuple(f"0000:{self._bus_nr(i) + 1:02x}:00.0" for i in range(len(self.gpus)))

    def qemu_args(self) -> list[str]:
        cores = self.ncpus // self.sockets
        args = [
            "-m", f"{self.memory_mib}M",
            "-smp", f"{self.ncpus},sockets={self.sockets},cores={cores},threads=1",
        ]
        for i, node in enumerate(self.nodes):
            args += ["-object", f"memory-backend-ram,id=mem{i},size={node.memory_mib}M",
                     "-numa", f"node,nodeid={i},memdev=mem{i}"]
        for i, node in enumerate(self.nodes):
            for c in node.cpus:
                args += ["-numa", f"cpu,node-id={i},socket-id={self.socket_of(c)},"
                                  f"core-id={c % cores},thread-id=0"]
        for i, row in enumerate(self.distances):
            for j, d in enumerate(row):
                if i != j:
                    args += ["-numa", f"dist,src={i},dst={j},val={d}"]
        for i, node in enumerate(self.gpus):
            args += [
                "-device", f"pxb-pcie,id=pxb{i},bus=pcie.0,bus_nr={self._bus_nr(i)},numa_node={node}",
                "-device", f"pcie-root-port,id=rp{i},bus=pxb{i},chassis={i + 1},slot=0",
                "-device", f"bochs-display,bus=rp{i},romfile=",
            ]
        return args

    def expected(self) -> dict:
        """The layout as JSON-able facts, for comparing with what the guest discovers."""
        return {
            "nodes": [{"id": i, "cpus": list(n.cpus), "memory_mib": n.memory_mib,
                       "distances": list(self.distances[i])} for i, n in enumerate(self.nodes)],
            "sockets": {s: [c for c in range(self.ncpus) if self.socket_of(c) == s]
                        for s in range(self.sockets)},
            "gpus": [{"pci_bus_id": a, "numa_node": n}
                     for a, n in zip(self.gpu_addresses, self.gpus, strict=True)],
        }


def _dist(groups: list[int], local: int = 10, near: int = 12, far: int = 21) -> tuple:
    """Distances for nodes grouped into sockets: ``groups[i]`` is node i's socket."""
    return tuple(tuple(local if i == j else near if groups[i] == groups[j] else far
                       for j in range(len(groups))) for i in range(len(groups)))


#: 2 sockets x 1 CPU, one node each (1 GiB), a GPU stand-in on node 1.
TWO_NODES = Layout("two-nodes", (NodeSpec(1024, (0,)), NodeSpec(1024, (1,))),
                   _dist([0, 1]), sockets=2, gpus=(1,))
#: Layout 1 with 1.5 GiB per node, for ``composer-numa launch``: the launcher and two ranks each
#: import Composer and torch, which leaves a 1 GiB node too little room for a rank's own memory.
TWO_NODES_LAUNCH = Layout("two-nodes-launch", (NodeSpec(3072, (0,)), NodeSpec(3072, (1,))),
                          _dist([0, 1]), sockets=2, gpus=(1,))
#: 2 sockets x 2 sub-NUMA clusters (distances 10 / 12 / 21), one GPU stand-in per node.
SNC = Layout("snc", tuple(NodeSpec(640, (i,)) for i in range(4)),
             _dist([0, 0, 1, 1]), sockets=2, gpus=(0, 1, 2, 3))
#: Node 0 has the CPUs, node 1 is memory only (GPU memory / CXL); a GPU stand-in hangs off node 1.
CPULESS = Layout("cpuless", (NodeSpec(1024, (0, 1)), NodeSpec(1024, ())),
                 ((10, 30), (30, 10)), sockets=1, gpus=(1,))
#: Node 1 (with the GPU stand-in) has only 512 MiB: too small for a 1 GiB job.
SMALL_NODE = Layout("small-node", (NodeSpec(1536, (0,)), NodeSpec(512, (1,))),
                    _dist([0, 1]), sockets=2, gpus=(1,))
#: NPS4-like: 2 sockets x 4 nodes, one CPU and 256 MiB each, a GPU stand-in on every other node.
NPS4 = Layout("nps4", tuple(NodeSpec(256, (i,)) for i in range(8)),
              _dist([0, 0, 0, 0, 1, 1, 1, 1], near=12, far=32), sockets=2, gpus=(0, 2, 4, 6))

LAYOUTS = {lay.name: lay for lay in (TWO_NODES, TWO_NODES_LAUNCH, SNC, CPULESS, SMALL_NODE, NPS4)}


# --------------------------------------------------------------------------- kernel


def cache_dir() -> Path:
    return Path(os.environ.get("COMPOSER_NUMA_VM_CACHE", HERE / ".cache"))


@dataclass(frozen=True)
class Kernel:
    vmlinuz: Path
    modules: Path  # .../lib/modules/VERSION

    @property
    def version(self) -> str:
        return self.modules.name


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise VmUnavailable(f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout).strip()[-300:]}")
    return p.stdout


def _find_kernel(root: Path) -> Kernel | None:
    for vmlinuz in sorted(root.glob("boot/vmlinuz-*")):
        mods = root / "lib" / "modules" / vmlinuz.name.removeprefix("vmlinuz-")
        if mods.is_dir():
            return Kernel(vmlinuz, mods)
    return None


def _kernel_package() -> str:
    """The versioned package behind the ``linux-image-amd64`` metapackage."""
    out = _run(["apt-cache", "depends", "linux-image-amd64"])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-[\w.+-]+)", line)
        if m and not m.group(1).startswith("linux-image-amd64"):
            return m.group(1)
    raise VmUnavailable("apt-cache knows no linux-image-amd64 dependency (run apt-get update?)")


def ensure_kernel() -> Kernel:
    """The guest kernel: from the environment, from the cache, or downloaded into the cache.

    Raises:
        VmUnavailable: no kernel and it cannot be fetched (not Debian, offline ...).
    """
    env_k, env_m = os.environ.get("COMPOSER_NUMA_VM_KERNEL"), os.environ.get("COMPOSER_NUMA_VM_MODULES")
    if env_k:
        if not env_m:
            raise VmUnavailable("COMPOSER_NUMA_VM_KERNEL is set but COMPOSER_NUMA_VM_MODULES is not")
        k = Kernel(Path(env_k), Path(env_m))
        if not k.vmlinuz.is_file() or not k.modules.is_dir():
            raise VmUnavailable(f"no kernel at {k.vmlinuz} with modules {k.modules}")
        return k
    root = cache_dir() / "kernel"
    if (k := _find_kernel(root)) is not None:
        return k
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise VmUnavailable(f"no guest kernel in {root} and no `{tool}` to fetch "
                                "Debian's linux-image-amd64 (or set COMPOSER_NUMA_VM_KERNEL)")
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / ".lock", "w") as lock:  # one download even with parallel runs
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (k := _find_kernel(root)) is not None:
            return k
        pkg = _kernel_package()
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            os.chmod(tmp, 0o755)  # apt's sandbox user must be able to write there
            _run(["apt-get", "download", "-q", pkg], cwd=Path(tmp))
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                raise VmUnavailable(f"apt-get download {pkg} produced no .deb")
            staging = Path(tmp) / "root"
            _run(["dpkg", "-x", str(debs[0]), str(staging)])
            if _find_kernel(staging) is None:
                raise VmUnavailable(f"{debs[0].name} holds no boot/vmlinuz-* with its modules")
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
    k = _find_kernel(root)
    assert k is not None
    return k


# --------------------------------------------------------------------------- initramfs


def _module_index(mods: Path) -> dict[str, Path]:
    """Module name (``-`` read as ``_``) -> file, for plain and compressed modules."""
    index: dict[str, Path] = {}
    for p in (mods / "kernel").rglob("*.ko*"):
        name = re.sub(r"\.ko(\.(xz|zst|gz))?$", "", p.name)
        if name != p.name:
            index[name.replace("-", "_")] = p
    return index


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise VmUnavailable(f"{path.name} is zstd-compressed and `zstd` is not installed")
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return data


def _depends(data: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    return [d.replace("-", "_") for d in m.group(1).decode().split(",") if d] if m else []


def _modules_dep(mods: Path) -> dict[str, list[str]] | None:
    """Dependencies from ``modules.dep`` when the package ships one (Debian generates it)."""
    dep = mods / "modules.dep"
    if not dep.is_file():
        return None
    out = {}
    for line in dep.read_text().splitlines():
        target, _, deps = line.partition(":")
        stem = lambda s: re.sub(r"\.ko(\.\w+)?$", "", Path(s).name).replace("-", "_")  # noqa: E731
        out[stem(target)] = [stem(d) for d in deps.split()]
    return out


def _builtin(mods: Path) -> set[str]:
    f = mods / "modules.builtin"
    if not f.is_file():
        return set()
    return {re.sub(r"\.ko$", "", Path(x).name).replace("-", "_") for x in f.read_text().split()}


def guest_modules(kernel: Kernel, wanted=GUEST_MODULES) -> list[tuple[str, bytes]]:
    """The modules to ``insmod``, dependencies first, decompressed.

    Dependencies come from ``modules.dep`` when present, else from each module's own
    ``depends=`` modinfo (the Debian package ships no modules.dep: depmod makes it at install).

    Raises:
        VmUnavailable: a wanted module is neither built in nor shipped (no 9p / virtio support).
    """
    builtin = _builtin(kernel.modules)
    index = _module_index(kernel.modules)
    depmap = _modules_dep(kernel.modules)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in seen or name in builtin:
            return
        if name not in index:
            raise VmUnavailable(f"kernel {kernel.version} has no module {name!r} "
                                f"(needed for {' <- '.join(chain)}): no virtio/9p support")
        data = _read_module(index[name])
        deps = depmap.get(name, []) if depmap is not None else _depends(data)
        seen.add(name)
        for d in deps:
            visit(d, (*chain, d))
        order.append((name, data))

    for w in wanted:
        visit(w, (w,))
    return order


_INIT = r"""#!/bin/busybox sh
# composer-numa VM rig init: mount the host's / over 9p, overlay a tmpfs, chroot, run, power off.
/bin/busybox mkdir -p /bin /proc /sys /dev /host /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
ip link set lo up || ifconfig lo 127.0.0.1 up  # torch.distributed's store talks over loopback
hostname numa-guest
fatal() { echo "VMRIG-FATAL: $*"; poweroff -f; sleep 5; }
for m in $(cat /modules.list); do
  insmod /lib/modules/$m.ko || fatal "insmod $m failed"
done
OPTS=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $OPTS,ro,cache=loose hostroot /host || fatal "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
if mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot; then
  echo "VMRIG-ROOT: overlay"
else
  echo "VMRIG-ROOT: read-only"
  RO_ROOT=1
  mount --bind /host /newroot
fi
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sys $R/sys
mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
# With the overlay, /tmp stays the host's (read-through, writes land in the overlay): the
# checkout or a virtualenv may live there. A read-only root needs tmpfs over it.
SCRATCH="/run /dev/shm"
[ -n "$RO_ROOT" ] && SCRATCH="/tmp /run /var/tmp /dev/shm"
for d in $SCRATCH; do mount -t tmpfs -o mode=1777 tmpfs $R$d; done
mkdir -p $R/run/vmio
mount -t 9p -o $OPTS vmio $R/run/vmio || fatal "cannot mount the I/O share over 9p"
echo "VMRIG-READY"
chroot $R /bin/sh -c '. /run/vmio/env.sh && cd "$VM_CWD" && exec /bin/sh /run/vmio/cmd.sh' \
  </dev/null >$R/run/vmio/stdout 2>$R/run/vmio/stderr
rc=$?
echo $rc > $R/run/vmio/rc.tmp && mv $R/run/vmio/rc.tmp $R/run/vmio/rc
sync
echo "VMRIG-DONE rc=$rc"
poweroff -f
"""


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed ``newc`` cpio archive of (path, mode, data) entries."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        out.write(hdr + nb)
        out.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))
    return out.getvalue()


def _is_static_elf(path: Path) -> bool:
    """A 64-bit little-endian ELF with no PT_INTERP (no dynamic loader needed)."""
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            return False
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def _busybox() -> Path:
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and _is_static_elf(p):
            return p
    raise VmUnavailable("no static busybox (install Debian's busybox-static)")


def build_initramfs(kernel: Kernel) -> Path:
    """Build (once per kernel and init script) the guest's initramfs in the cache."""
    busybox = _busybox()
    key = hashlib.sha256(f"{kernel.vmlinuz}|{kernel.version}|{busybox.stat().st_mtime}".encode()
                         + _INIT.encode()).hexdigest()[:16]
    path = cache_dir() / f"initramfs-{kernel.version}-{key}.cpio"
    if path.is_file():
        return path
    mods = guest_modules(kernel)
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [("bin", d, b""), ("dev", d, b""), ("lib", d, b""), ("lib/modules", d, b""),
               ("bin/busybox", x, busybox.read_bytes()), ("init", x, _INIT.encode()),
               ("modules.list", f, "\n".join(n for n, _ in mods).encode() + b"\n")]
    entries += [(f"lib/modules/{n}.ko", f, data) for n, data in mods]
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_cpio_newc(entries))
    tmp.rename(path)
    for old in cache_dir().glob("initramfs-*.cpio"):  # earlier init scripts or kernels
        if old != path:
            old.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- availability


_unavailable: dict[str, str | None] = {}


def unavailable_reason() -> str | None:
    """Why the VM tests cannot run here (None when they can). Fetches the kernel if needed."""
    if "r" in _unavailable:
        return _unavailable["r"]
    reason = None
    try:
        if os.environ.get("COMPOSER_NUMA_VM", "1").lower() in ("0", "no", "false", "off"):
            raise VmUnavailable("COMPOSER_NUMA_VM=0")
        if not sys.platform.startswith("linux"):
            raise VmUnavailable("the VM rig runs on Linux hosts only")
        if shutil.which(QEMU) is None:
            raise VmUnavailable(f"{QEMU} not found (install Debian's qemu-system-x86)")
        devices = subprocess.run([QEMU, "-device", "help"], capture_output=True, text=True,
                                 timeout=60).stdout
        for dev in ("virtio-9p-pci", "pxb-pcie", "bochs-display"):
            if f'"{dev}"' not in devices:
                raise VmUnavailable(f"{QEMU} lacks the {dev} device (9p/virtfs support)")
        build_initramfs(ensure_kernel())
    except VmUnavailable as e:
        reason = f"VM tests unavailable: {e}"
    except (OSError, subprocess.SubprocessError) as e:
        reason = f"VM tests unavailable: {type(e).__name__}: {e}"
    _unavailable["r"] = reason
    return reason


# --------------------------------------------------------------------------- running


@dataclass
class VmResult:
    """What one guest run gave back.

    Attributes:
        returncode: exit status of the command in the guest.
        stdout, stderr: the command's output.
        console: the serial console (kernel messages and the rig's own lines).
        seconds: wall time of the whole boot.
        files: files the command wrote under ``$VM_OUT`` (name -> bytes).
    """

    returncode: int
    stdout: str
    stderr: str
    console: str
    seconds: float
    files: dict[str, bytes] = field(default_factory=dict)

    def json(self) -> object:
        """The whole stdout as JSON, else its last line that parses as JSON."""
        try:
            return json.loads(self.stdout)
        except ValueError:
            pass
        for line in reversed(self.stdout.splitlines()):
            line = line.strip()
            if line.startswith(("{", "[")):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        raise AssertionError(f"no JSON line in guest stdout:\n{self.stdout[-3000:]}\n"
                             f"stderr:\n{self.stderr[-3000:]}")

    def describe(self) -> str:
        return (f"rc={self.returncode} after {self.seconds:.1f}s\n--- stdout\n{self.stdout[-4000:]}"
                f"\n--- stderr\n{self.stderr[-4000:]}\n--- console\n{self.console[-2000:]}")


def _guest_env(extra: dict[str, str] | None, cwd: str) -> str:
    py_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{py_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/tmp/home",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "VM_OUT": "/run/vmio/out",
        "VM_CWD": cwd,
        "VM_PYTHON": sys.executable,
        "VM_REPO": str(REPO),
    }
    env.update(extra or {})
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    return "\n".join(["mkdir -p /tmp/home /run/vmio/out", *lines]) + "\n"


def run_in_vm(layout: Layout, command: list[str] | str, *, timeout: float = 300,
              env: dict[str, str] | None = None, cwd: str | Path = REPO,
              kernel_args: str = "") -> VmResult:
    """Boot a guest with ``layout``, run ``command`` in it, power off, return the result.

    Args:
        layout: the guest's NUMA layout.
        command: argv list, or a shell script (``/bin/sh``) string.
        timeout: hard limit in seconds for the whole boot; the guest is killed after it.
        env: extra environment for the command (on top of PATH, HOME=/tmp/home, TMPDIR,
            ``VM_OUT`` - a directory whose files come back in :attr:`VmResult.files`,
            ``VM_PYTHON`` - the host's interpreter, ``VM_REPO``).
        cwd: working directory in the guest (host paths are the same inside).
        kernel_args: appended to the kernel command line.

    Raises:
        VmUnavailable: qemu or the kernel is missing, or the guest cannot mount 9p.
        VmError: the guest did not finish in time or its init failed.
    """
    reason = unavailable_reason()
    if reason:
        raise VmUnavailable(reason)
    kernel = ensure_kernel()
    initrd = build_initramfs(kernel)
    script = command if isinstance(command, str) else shlex.join(command)
    iodir = Path(tempfile.mkdtemp(prefix=f"cnuma-vm-{layout.name}-"))
    try:
        (iodir / "env.sh").write_text(_guest_env(env, str(cwd)))
        (iodir / "cmd.sh").write_text(script + "\n")
        console = iodir / "console.log"
        append = ("console=ttyS0 quiet loglevel=3 panic=-1 oops=panic rdinit=/init "
                  "numa_balancing=disable mitigations=off no_timer_check tsc=reliable "
                  "8250.nr_uarts=1 i8042.noaux i8042.nokbd " + kernel_args).strip()
        cmd = [
            QEMU, "-accel", "tcg,thread=multi", "-machine", "q35", "-cpu", "max",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-serial", f"file:{console}", "-monitor", "none",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd), "-append", append,
            *layout.qemu_args(),
            # -fsdev + -device rather than -virtfs: the 9p devices must sit on pcie.0, not on
            # an expander (which only takes bridges).
            "-fsdev", "local,id=fs0,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=fs0,mount_tag=hostroot,bus=pcie.0",
            "-fsdev", f"local,id=fs1,path={iodir},security_model=none,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=fs1,mount_tag=vmio,bus=pcie.0",
        ]
        t0 = time.monotonic()
        with open(iodir / "qemu.log", "wb") as qlog:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise VmError(f"{layout.name}: guest did not finish within {timeout:.0f}s\n"
                              f"--- console\n{_tail(console)}\n--- stdout\n"
                              f"{_tail(iodir / 'stdout')}\n--- stderr\n{_tail(iodir / 'stderr')}") from None
        seconds = time.monotonic() - t0
        con = _tail(console, 200_000)
        if proc.returncode != 0:
            raise VmError(f"{layout.name}: qemu exited {proc.returncode}: "
                          f"{_tail(iodir / 'qemu.log')}\n--- console\n{con[-3000:]}")
        if "VMRIG-FATAL" in con:
            line = next(ln for ln in con.splitlines() if "VMRIG-FATAL" in ln)
            if "9p" in line:
                raise VmUnavailable(f"guest kernel {kernel.version}: {line.strip()}")
            raise VmError(f"{layout.name}: {line.strip()}\n--- console\n{con[-3000:]}")
        if not (iodir / "rc").is_file():
            raise VmError(f"{layout.name}: guest powered off without a result\n"
                          f"--- console\n{con[-3000:]}")
        out = iodir / "out"
        files = {str(p.relative_to(out)): p.read_bytes()
                 for p in sorted(out.rglob("*")) if p.is_file()} if out.is_dir() else {}
        return VmResult(
            returncode=int((iodir / "rc").read_text().strip()),
            stdout=(iodir / "stdout").read_text(errors="replace"),
            stderr=(iodir / "stderr").read_text(errors="replace"),
            console=con,
            seconds=seconds,
            files=files,
        )
    finally:
        if os.environ.get("COMPOSER_NUMA_VM_KEEP") == "1":
            print(f"[vm] kept {iodir}", file=sys.stderr)
        else:
            shutil.rmtree(iodir, ignore_errors=True)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def run_pytest_in_vm(layout: Layout, selection: list[str], *, timeout: float = 600,
                     env: dict[str, str] | None = None, extra_args: list[str] = ()) -> VmResult:
    """Run ``python -m pytest SELECTION`` inside a guest (paths relative to the repo root).

    The guest's pytest writes a JUnit report to ``$VM_OUT/junit.xml`` (in ``files``).
    """
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--junitxml=/run/vmio/out/junit.xml", *extra_args, *selection]
    return run_in_vm(layout, cmd, timeout=timeout, env=env)


@dataclass
class CheckResult:
    """One command of a batch run in a single boot."""

    name: str
    returncode: int | None  # None: it did not run (the guest stopped first)
    stdout: str
    stderr: str
    seconds: float | None

    def json(self) -> object:
        """The last stdout line that parses as JSON."""
        return VmResult(self.returncode or 0, self.stdout, self.stderr, "", 0.0).json()

    def describe(self) -> str:
        return (f"check {self.name}: rc={self.returncode}\n--- stdout\n{self.stdout[-3000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


def run_checks_in_vm(layout: Layout, checks: dict[str, list[str] | str], *,
                     timeout: float = 600, check_timeout: float = 240,
                     env: dict[str, str] | None = None) -> tuple[dict[str, CheckResult], VmResult]:
    """Run several named commands one after another in ONE boot (boots are the slow part).

    Each command's stdout, stderr, exit status and duration come back separately; a command
    that runs past ``check_timeout`` is killed (exit 124) and the next one runs.

    Returns:
        (name -> :class:`CheckResult`, the boot's :class:`VmResult`).
    """
    if not checks:
        raise ValueError("no checks to run")
    lines = ["cd \"$VM_REPO\""]
    for name, cmd in checks.items():
        if not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"check name {name!r}: use letters, digits, '.', '-', '_'")
        script = cmd if isinstance(cmd, str) else shlex.join(cmd)
        o = f"$VM_OUT/{name}"
        lines += [
            f"echo '>>> {name}' >&2",
            "t0=$(date +%s.%N)",
            f"timeout -k 5 {int(check_timeout)} /bin/sh -c {shlex.quote(script)} "
            f"</dev/null >{o}.out 2>{o}.err",
            f"echo $? >{o}.rc",
            f"echo \"$t0 $(date +%s.%N)\" >{o}.time",
        ]
    boot = run_in_vm(layout, "\n".join(lines), timeout=timeout, env=env)
    results = {}
    for name in checks:
        f = boot.files
        rc = f.get(f"{name}.rc")
        t = f.get(f"{name}.time", b"").split()
        results[name] = CheckResult(
            name=name,
            returncode=int(rc) if rc else None,
            stdout=f.get(f"{name}.out", b"").decode(errors="replace"),
            stderr=f.get(f"{name}.err", b"").decode(errors="replace"),
            seconds=float(t[1]) - float(t[0]) if len(t) == 2 else None,
        )
    return results, boot


if __name__ == "__main__":  # python tests/vm/harness.py LAYOUT -- CMD...
    import argparse

    ap = argparse.ArgumentParser(description="boot a NUMA guest and run a command in it")
    ap.add_argument("layout", choices=sorted(LAYOUTS))
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.command[1:] if a.command[:1] == ["--"] else a.command
    r = run_in_vm(LAYOUTS[a.layout], argv or "numactl -H", timeout=a.timeout)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    print(f"[vm] {a.layout}: rc={r.returncode} in {r.seconds:.1f}s", file=sys.stderr)
    sys.exit(r.returncode)
