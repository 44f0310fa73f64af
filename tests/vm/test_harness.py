"""The QEMU rig's own pieces, without booting: layouts, QEMU arguments, module
dependencies (plain and compressed), the cpio writer, the kernel look-up."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.vm import harness
from tests.vm.harness import LAYOUTS, SNC, TWO_NODES, Kernel, Layout, NodeSpec


def test_layouts_are_consistent():
    for lay in LAYOUTS.values():
        # guests must fit beside the suite on a 24 GiB CI machine (QEMU faults guest RAM in lazily)
        assert lay.memory_mib <= 6 * 1024 and lay.ncpus <= 8, lay.name
        assert len(lay.gpu_addresses) == len(lay.gpus)
        assert len(set(lay.gpu_addresses)) == len(lay.gpus)


@pytest.mark.parametrize("bad", [
    dict(nodes=(NodeSpec(256, (0,)),), distances=((10, 20),)),
    dict(nodes=(NodeSpec(256, (1,)),), distances=((10,),)),
    dict(nodes=(NodeSpec(256, ()),), distances=((10,),)),
    dict(nodes=(NodeSpec(256, (0, 1, 2)),), distances=((10,),), sockets=2),
    dict(nodes=(NodeSpec(256, (0,)),), distances=((10,),), gpus=(1,)),
])
def test_bad_layouts_are_refused(bad):
    with pytest.raises(ValueError):
        Layout("bad", **bad)


def test_qemu_args_describe_the_layout():
    args = TWO_NODES.qemu_args()
    joined = " ".join(args)
    assert "-m 2048M" in joined and "-smp 2,sockets=2,cores=1,threads=1" in joined
    assert "memory-backend-ram,id=mem1,size=1024M" in joined
    assert "cpu,node-id=1,socket-id=1,core-id=0,thread-id=0" in joined
    assert "dist,src=0,dst=1,val=21" in joined and "dist,src=1,dst=0,val=21" in joined
    assert "pxb-pcie,id=pxb0,bus=pcie.0,bus_nr=32,numa_node=1" in joined
    assert TWO_NODES.gpu_addresses == ("0000:21:00.0",)
    snc = " ".join(SNC.qemu_args())
    assert "dist,src=0,dst=1,val=12" in snc and "dist,src=1,dst=2,val=21" in snc
    assert SNC.expected()["sockets"] == {0: [0, 1], 1: [2, 3]}


def _fake_module(path: Path, deps: str, compress: bool = False) -> None:
    data = b"\x7fELF-not-really\0license=GPL\0depends=" + deps.encode() + b"\0vermagic=6.1\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".xz").write_bytes(lzma.compress(data))
    else:
        path.write_bytes(data)


def test_module_dependencies_come_first_and_are_decompressed(tmp_path):
    mods = tmp_path / "lib" / "modules" / "6.1.0-test"
    k = mods / "kernel"
    _fake_module(k / "fs/9p/9p.ko", "9pnet,netfs", compress=True)
    _fake_module(k / "net/9p/9pnet.ko", "")
    _fake_module(k / "net/9p/9pnet_virtio.ko", "virtio,9pnet")
    _fake_module(k / "fs/netfs/netfs.ko", "")
    _fake_module(k / "drivers/virtio/virtio_pci.ko", "virtio")
    (mods / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\n"
                                          "kernel/fs/overlayfs/overlay.ko\n")
    kernel = Kernel(tmp_path / "vmlinuz", mods)
    order = harness.guest_modules(kernel)
    names = [n for n, _ in order]
    assert names == ["virtio_pci", "9pnet", "9pnet_virtio", "netfs", "9p"]
    assert all(data.startswith(b"\x7fELF") for _, data in order)  # xz undone


def test_missing_9p_module_is_a_skip_reason(tmp_path):
    mods = tmp_path / "lib" / "modules" / "6.1.0-test"
    _fake_module(mods / "kernel/drivers/virtio/virtio_pci.ko", "")
    with pytest.raises(harness.VmUnavailable, match="9pnet_virtio"):
        harness.guest_modules(Kernel(tmp_path / "vmlinuz", mods))


def test_cpio_archive_lists_its_files(tmp_path):
    blob = harness._cpio_newc([("bin", 0o40755, b""), ("init", 0o100755, b"#!/bin/sh\n"),
                               ("odd", 0o100644, b"x" * 5)])
    names, off = [], 0
    while True:
        hdr = blob[off:off + 110]
        assert hdr[:6] == b"070701"
        size, namesize = int(hdr[54:62], 16), int(hdr[94:102], 16)
        name = blob[off + 110:off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += -off % 4
        data = blob[off:off + size]
        off += size + (-size % 4)
        if name == "TRAILER!!!":
            break
        names.append((name, data))
    assert names == [("bin", b""), ("init", b"#!/bin/sh\n"), ("odd", b"xxxxx")]
    if shutil.which("cpio"):
        listed = subprocess.run(["cpio", "-t", "--quiet"], input=blob, capture_output=True)
        assert listed.stdout.decode().split() == ["bin", "init", "odd"]


def test_static_elf_detection(tmp_path):
    assert not harness._is_static_elf(Path("/bin/sh").resolve())  # dynamically linked
    not_elf = tmp_path / "x"
    not_elf.write_bytes(b"#!/bin/sh\n")
    assert not harness._is_static_elf(not_elf)
    static = tmp_path / "static"
    # minimal ELF64 header with one PT_LOAD program header and no PT_INTERP
    eh = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0,
                                                           0, 64, 56, 1, 0, 0, 0)
    static.write_bytes(eh + struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0))
    assert harness._is_static_elf(static)


def test_kernel_from_environment_must_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPOSER_NUMA_VM_KERNEL", str(tmp_path / "vmlinuz"))
    monkeypatch.setenv("COMPOSER_NUMA_VM_MODULES", str(tmp_path / "mods"))
    with pytest.raises(harness.VmUnavailable, match="no kernel at"):
        harness.ensure_kernel()
    monkeypatch.delenv("COMPOSER_NUMA_VM_MODULES")
    with pytest.raises(harness.VmUnavailable, match="COMPOSER_NUMA_VM_MODULES"):
        harness.ensure_kernel()


def test_vm_results_parse_json():
    r = harness.VmResult(0, 'noise\n{"a": 1}\n', "", "", 1.0)
    assert r.json() == {"a": 1}
    assert harness.VmResult(0, '{\n  "b": [1, 2]\n}\n', "", "", 1.0).json() == {"b": [1, 2]}
    with pytest.raises(AssertionError, match="no JSON"):
        harness.VmResult(0, "nothing\n", "", "", 1.0).json()
