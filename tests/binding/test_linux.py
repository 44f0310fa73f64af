"""The syscall layer against the live kernel (in subprocesses where it changes state)."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from composer_numa.binding import linux
from composer_numa.units import parse_cpulist

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                 os.environ.get("PYTHONPATH")])))

needs_numa = pytest.mark.skipif(
    not os.path.exists("/sys/devices/system/node/node0"),
    reason="kernel without NUMA support (no /sys/devices/system/node)")


def run_py(code: str) -> dict:
    """Run code in a fresh interpreter (so this process is never left bound); it prints JSON."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def status_field(name: str, tid: int | None = None) -> str:
    path = "/proc/self/status" if tid is None else f"/proc/self/task/{tid}/status"
    for line in Path(path).read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {path}")


def test_syscall_numbers_match_the_kernel_headers():
    header = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
    if not header.exists():
        pytest.skip("x86_64 kernel headers not installed")
    text = header.read_text()
    want = [int(re.search(rf"#define __NR_{name} (\d+)", text).group(1))
            for name in ("mbind", "set_mempolicy", "get_mempolicy", "migrate_pages",
                         "move_pages")]
    assert list(linux._SYSCALLS["x86_64"]) == want
    # the generic table (arm64, riscv64): mbind 235, get 236, set 237, migrate 238, move 239
    assert linux._SYSCALLS["aarch64"] == (235, 237, 236, 238, 239)


@needs_numa
@pytest.mark.parametrize("mode, nodes, expected", [
    ("MPOL_PREFERRED", [0], ["preferred", [0]]),
    ("MPOL_BIND", [0], ["bind", [0]]),
    ("MPOL_INTERLEAVE", [0], ["interleave", [0]]),
    ("MPOL_LOCAL", [], ["local", []]),
])
def test_policy_set_and_read_back_on_node0(mode, nodes, expected):
    got = run_py(
        "import json; from composer_numa.binding import linux as L\n"
        "before = L.get_mempolicy()\n"
        f"L.set_mempolicy(L.{mode}, {nodes})\n"
        "m, n = L.get_mempolicy()\n"
        "L.set_mempolicy(L.MPOL_DEFAULT)\n"
        "print(json.dumps([L.POLICY_NAMES[before[0]], [L.POLICY_NAMES[m], list(n)],"
        " L.POLICY_NAMES[L.get_mempolicy()[0]]]))")
    assert got == ["default", expected, "default"]


@needs_numa
def test_preferred_many_or_a_clear_unsupported_error():
    got = run_py(
        "import json; from composer_numa.binding import linux as L\n"
        "try:\n"
        "    L.set_mempolicy(L.MPOL_PREFERRED_MANY, [0]); r = list(L.get_mempolicy()[1])\n"
        "    print(json.dumps(['ok', L.POLICY_NAMES[L.get_mempolicy()[0]], r]))\n"
        "except OSError as e:\n"
        "    print(json.dumps(['err', e.errno, str(e)]))")
    if got[0] == "ok":
        assert got[1:] == ["preferred-many", [0]]
    else:
        assert got[1] == errno.EINVAL and "does not support" in got[2]


@needs_numa
def test_bind_to_node_63_is_a_clear_error():
    with pytest.raises(linux.NumaSyscallError) as info:
        linux.set_mempolicy(linux.MPOL_BIND, [63])
    e = info.value
    assert e.errno == errno.EINVAL
    assert isinstance(e, OSError)
    msg = str(e)
    assert "node 63" in msg and "not an allowed memory node" in msg
    assert f"allowed: {status_field('Mems_allowed_list')}" in msg
    assert "\n" not in msg
    # a failed call leaves the policy alone
    assert linux.get_mempolicy() == (linux.MPOL_DEFAULT, ())


def test_node_beyond_the_kernel_mask_is_rejected_before_the_call():
    with pytest.raises(linux.NumaSyscallError, match=r"node 100000 is outside"):
        linux.set_mempolicy(linux.MPOL_BIND, [100000])
    with pytest.raises(linux.NumaSyscallError, match=r"node -1 is outside"):
        linux.set_mempolicy(linux.MPOL_BIND, [-1])


@needs_numa
def test_mems_allowed_matches_proc_status():
    assert linux.mems_allowed() == parse_cpulist(status_field("Mems_allowed_list"))


def test_mask_round_trip():
    nodes = (0, 1, 63, 64, 65, 127, 500, 1023)
    buf, maxnode = linux._mask(nodes, "test")
    assert maxnode == linux._kernel_mask_bits() + 1
    assert linux._unmask(buf) == nodes


def _touched_buffer(pages: int) -> tuple[mmap.mmap, int]:
    buf = mmap.mmap(-1, pages * mmap.PAGESIZE)
    for i in range(pages):
        buf[i * mmap.PAGESIZE] = 1
    return buf, ctypes.addressof(ctypes.c_char.from_buffer(buf))


@needs_numa
def test_move_pages_query_and_node_of_address():
    buf, addr = _touched_buffer(16)
    try:
        allowed = set(linux.mems_allowed())
        status = linux.move_pages(0, [addr + i * mmap.PAGESIZE for i in range(16)])
        assert len(status) == 16 and set(status) <= allowed
        assert linux.node_of_address(addr) in allowed
        # an unmapped address reports -EFAULT per page, not an exception
        assert linux.move_pages(0, [8]) == [-errno.EFAULT]
    finally:
        del addr
        buf.close()


@needs_numa
def test_mbind_moves_and_rejects_bad_nodes():
    buf, addr = _touched_buffer(32)
    try:
        length = 32 * mmap.PAGESIZE
        linux.mbind(addr, length, linux.MPOL_BIND, [0], linux.MPOL_MF_MOVE | linux.MPOL_MF_STRICT)
        assert set(linux.move_pages(0, [addr + i * mmap.PAGESIZE for i in range(32)])) == {0}
        with pytest.raises(linux.NumaSyscallError, match="node 63 is not an allowed"):
            linux.mbind(addr, length, linux.MPOL_BIND, [63])
        linux.mbind(addr, length, linux.MPOL_DEFAULT)
    finally:
        del addr
        buf.close()


@needs_numa
def test_migrate_pages():
    assert linux.migrate_pages(0, linux.mems_allowed(), [0]) == 0
    with pytest.raises(linux.NumaSyscallError, match="node 63 is not an allowed"):
        linux.migrate_pages(0, [0], [63])
    with pytest.raises(linux.NumaSyscallError, match="no such process"):
        linux.migrate_pages(2**22 + 12345, [0], [0])


def test_affinity_per_thread_in_a_subprocess():
    cpus = sorted(os.sched_getaffinity(0))
    one = cpus[-1]
    got = run_py(
        "import json, threading, os\n"
        "from composer_numa.binding import linux as L\n"
        "ev = threading.Event(); t = threading.Thread(target=ev.wait); t.start()\n"
        f"L.set_affinity([{one}], t.native_id)\n"
        "def allowed(tid):\n"
        "    for line in open(f'/proc/self/task/{tid}/status'):\n"
        "        if line.startswith('Cpus_allowed_list:'): return line.split(':')[1].strip()\n"
        "r = [allowed(t.native_id), allowed(L.current_tid()), list(L.get_affinity(t.native_id)),"
        " sorted(L.thread_ids()) == sorted(int(x) for x in os.listdir('/proc/self/task'))]\n"
        "ev.set(); t.join(); print(json.dumps(r))")
    assert got[0] == str(one)
    assert parse_cpulist(got[1]) == tuple(cpus)  # the main thread is untouched
    assert got[2] == [one]
    assert got[3] is True


def test_affinity_errors_are_clear():
    with pytest.raises(linux.NumaSyscallError, match="none of these CPUs is online") as info:
        linux.set_affinity([4095])
    assert info.value.errno == errno.EINVAL
    with pytest.raises(linux.NumaSyscallError, match="empty CPU set"):
        linux.set_affinity([])
    with pytest.raises(linux.NumaSyscallError, match="no such thread"):
        linux.set_affinity(sorted(os.sched_getaffinity(0)), 2**22 + 12345)


def test_not_linux_is_reported(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "not Linux" in linux.unsupported_reason()
    with pytest.raises(linux.NumaSyscallError, match="not Linux") as info:
        linux.get_mempolicy()
    assert info.value.errno == errno.ENOSYS


def test_kernel_without_numa_gives_enosys_message(monkeypatch):
    monkeypatch.setattr(linux, "_call", lambda name, *a: -errno.ENOSYS)
    with pytest.raises(linux.NumaSyscallError, match="no NUMA support") as info:
        linux.set_mempolicy(linux.MPOL_BIND, [0])
    assert info.value.errno == errno.ENOSYS
    # mems_allowed falls back to the status file
    assert linux.mems_allowed()


def test_eperm_message_mentions_seccomp(monkeypatch):
    monkeypatch.setattr(linux, "_call", lambda name, *a: -errno.EPERM)
    with pytest.raises(linux.NumaSyscallError, match="not permitted"):
        linux.set_mempolicy(linux.MPOL_PREFERRED, [0])
