"""numa_maps parsing: recorded samples, a line-by-line reference, and the live kernel."""

from __future__ import annotations

import mmap
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from composer_numa.binding import locality
from composer_numa.binding.locality import local_fraction, parse_numa_maps, parse_policy, task_policy

DATA = Path(__file__).resolve().parents[1] / "data" / "numa_maps"
KB4 = 4096
MIB = 1 << 20
GIB = 1 << 30


def sample(name: str) -> str:
    return (DATA / name).read_text()


def test_two_node_training_process():
    m = parse_numa_maps(sample("two_node.txt"), base_page_kb=4)
    # anonymous, heap, stack, interleaved and /dev/shm pages are the process's own
    assert m.process == {0: (1024 + 40 + 500) * KB4,
                         1: (2048 + 261120 + 512 + 60 + 500 + 33) * KB4}
    # the executable, libc and libtorch (a path with an escaped space) are page cache
    assert m.file == {0: (1024 + 40 + 250 + 4096) * KB4, 1: 50 * KB4}
    assert m.huge == {}
    assert m.mappings == 12
    assert m.local_fraction([1]) == pytest.approx(264273 / (264273 + 1564))
    assert m.local_fraction([0, 1]) == 1.0
    assert m.local_fraction([1], include_file=True) == pytest.approx(
        (264273 + 50) / (264273 + 1564 + 5410 + 50))
    assert m.total == {0: (1564 + 5410) * KB4, 1: (264273 + 50) * KB4}


def test_huge_pages_count_in_their_own_page_size():
    m = parse_numa_maps(sample("hugetlb.txt"), base_page_kb=4)
    assert m.huge == {0: 2 * 2 * MIB, 1: 6 * 2 * MIB + 3 * GIB}
    # hugetlb (anonymous or on hugetlbfs), memfd and 4 kB THP-backed anon are process memory
    assert m.process == {0: 2 * 2 * MIB + 64 * KB4, 1: 6 * 2 * MIB + 3 * GIB + 1024 * KB4}
    assert m.file == {0: 10 * KB4}
    assert m.local_fraction([1]) > 0.99


def test_many_nodes_and_policy_flags():
    m = parse_numa_maps(sample("nine_node.txt"), base_page_kb=4)
    expected = {n: 1000 * KB4 for n in range(9)}
    expected[5] += 4096 * KB4
    expected[8] += 90 * KB4
    expected[7] += 7 * KB4
    expected[63] = 10 * KB4
    assert m.process == expected
    assert m.file == {n: 100 * KB4 for n in range(9)}
    assert m.mappings == 6


def test_local_fraction_edge_cases():
    assert local_fraction({}, [0]) is None
    assert local_fraction({0: 0}, [0]) is None
    assert local_fraction({0: 3, 1: 1}, [1]) == 0.25
    assert local_fraction({0: 3, 1: 1}, []) == 0.0
    assert parse_numa_maps("").process == {}
    assert parse_numa_maps("\n\n").mappings == 0


def test_base_page_size_other_than_4k():
    # 64 kB base pages (arm64 kernels): lines carry kernelpagesize_kB=64
    text = "7f0000000000 default anon=10 dirty=10 N1=10 kernelpagesize_kB=64\n"
    assert parse_numa_maps(text, base_page_kb=64).process == {1: 10 * 64 * 1024}
    assert parse_numa_maps(text, base_page_kb=4).process == {1: 10 * 64 * 1024}
    # a line without kernelpagesize_kB (very old kernels) uses the base page size
    assert parse_numa_maps("7f00 default anon=2 N0=2\n", base_page_kb=16).process == {
        0: 2 * 16 * 1024}


@pytest.mark.parametrize("text, expected", [
    ("default", ("default", ())),
    ("local", ("local", ())),
    ("prefer:1", ("preferred", (1,))),
    ("prefer=static:0", ("preferred", (0,))),
    ("prefer (many):0-1,3", ("preferred-many", (0, 1, 3))),
    ("bind:0-3", ("bind", (0, 1, 2, 3))),
    ("bind=static|relative:2", ("bind", (2,))),
    ("interleave:0,2", ("interleave", (0, 2))),
    ("weighted interleave:0-8", ("weighted-interleave", tuple(range(9)))),
    ("file=/x", None),
    ("prefer:", None),
])
def test_parse_policy(text, expected):
    assert parse_policy(text) == expected


def test_task_policy_from_recorded_file(tmp_path):
    proc = tmp_path / "proc"
    (proc / "42" / "task" / "43").mkdir(parents=True)
    shutil.copy(DATA / "two_node.txt", proc / "42" / "numa_maps")
    shutil.copy(DATA / "nine_node.txt", proc / "42" / "task" / "43" / "numa_maps")
    # most mappings show the task's policy; the bind/interleave ones are mbind()ed ranges
    assert task_policy(42, proc_root=str(proc)) == ("preferred", (1,))
    assert task_policy(42, 43, proc_root=str(proc)) is not None
    assert task_policy(41, proc_root=str(proc)) is None


# -- a line-by-line reference on generated files --------------------------------------

def reference(text: str, base_kb: int) -> tuple[dict, dict, dict]:
    process: dict[int, int] = {}
    file: dict[int, int] = {}
    huge: dict[int, int] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        kb = base_kb
        path = None
        is_huge = False
        counts = []
        for f in fields[1:]:
            if f.startswith("kernelpagesize_kB="):
                kb = int(f.split("=")[1])
            elif f.startswith("file="):
                path = f[5:]
            elif f == "huge":
                is_huge = True
            elif re.fullmatch(r"N\d+=\d+", f):
                n, c = f[1:].split("=")
                counts.append((int(n), int(c)))
        cache = path is not None and not is_huge and not path.startswith(
            ("/dev/shm/", "/memfd:", "/anon_hugepage", "/SYSV", "/dev/zero"))
        for n, c in counts:
            target = file if cache else process
            target[n] = target.get(n, 0) + c * kb * 1024
            if is_huge:
                huge[n] = huge.get(n, 0) + c * kb * 1024
    return process, file, huge


_policies = st.sampled_from(["default", "prefer:1", "bind:0-1", "interleave:0-3", "local",
                             "prefer (many):0,2", "weighted interleave:0-8"])
_kinds = st.sampled_from(["anon", "heap", "stack", "lib", "shm", "memfd", "hugeanon", "hugefs",
                          "empty"])


@st.composite
def numa_maps_line(draw, i: int = 0):
    addr = f"{0x7f0000000000 + draw(st.integers(0, 1 << 30)) * 4096:x}"
    pol = draw(_policies)
    kind = draw(_kinds)
    if kind == "empty":
        return f"{addr} {pol}"
    nodes = draw(st.dictionaries(st.integers(0, 70), st.integers(1, 10**6), min_size=1,
                                 max_size=9))
    ncounts = " ".join(f"N{n}={c}" for n, c in sorted(nodes.items()))
    total = sum(nodes.values())
    kb = 4
    head = {
        "anon": f"anon={total} dirty={total}",
        "heap": f"heap anon={total} dirty={total}",
        "stack": f"stack anon={total} dirty={total}",
        "lib": f"file=/usr/lib/lib{i}.so mapped={total} mapmax=3",
        "shm": f"file=/dev/shm/torch_{i} dirty={total}",
        "memfd": f"file=/memfd:pinned\\040(deleted) dirty={total}",
        "hugeanon": f"file=/anon_hugepage\\040(deleted) huge anon={total} dirty={total}",
        "hugefs": f"file=/dev/hugepages/w{i} huge dirty={total}",
    }[kind]
    if kind.startswith("huge"):
        kb = draw(st.sampled_from([2048, 1048576]))
    return f"{addr} {pol} {head} {ncounts} kernelpagesize_kB={kb}"


@settings(max_examples=60, deadline=None)
@given(st.lists(numa_maps_line(), max_size=40))
def test_matches_line_by_line_reference(lines):
    text = "\n".join(lines) + ("\n" if lines else "")
    m = parse_numa_maps(text, base_page_kb=4)
    assert (m.process, m.file, m.huge) == reference(text, 4)
    assert m.mappings == len(lines)


def test_large_file_matches_reference():
    # the size of the kernel's default mapping limit (vm.max_map_count = 65530)
    lines = []
    for i in range(65530):
        k = i % 10
        if k < 6:
            lines.append(f"7f{i:010x} default anon={i % 500} N0={i % 300} N{i % 9}={i % 200} "
                         "kernelpagesize_kB=4")
        elif k < 8:
            lines.append(f"7f{i:010x} prefer:1 file=/usr/lib/libtorch_cpu.so mapped=12 "
                         "N0=10 N3=2 kernelpagesize_kB=4")
        elif k == 8:
            lines.append(f"7f{i:010x} default file=/anon_hugepage\\040(deleted) huge "
                         "N1=2 kernelpagesize_kB=2048")
        else:
            lines.append(f"7f{i:010x} default")
    text = "\n".join(lines) + "\n"
    m = parse_numa_maps(text, base_page_kb=4)
    assert (m.process, m.file, m.huge) == reference(text, 4)
    assert m.mappings == 65530


# -- the live kernel ---------------------------------------------------------------------

needs_numa_maps = pytest.mark.skipif(not os.path.exists("/proc/self/numa_maps"),
                                     reason="kernel without NUMA support (no numa_maps)")


@needs_numa_maps
def test_live_process_memory_grows_by_what_we_touch():
    from composer_numa.binding.linux import mems_allowed

    before = locality.read_numa_maps()
    size = 48 * MIB
    buf = mmap.mmap(-1, size)
    try:
        for off in range(0, size, 4096):
            buf[off] = 1
        after = locality.read_numa_maps()
    finally:
        buf.close()
    grown = sum(after.process.values()) - sum(before.process.values())
    assert grown >= size * 0.95
    assert set(after.process) <= set(mems_allowed())
    assert after.local_fraction(mems_allowed()) == 1.0


@needs_numa_maps
def test_live_task_policy_follows_set_mempolicy():
    import subprocess
    import sys

    code = (
        "from composer_numa.binding import linux, locality;"
        "print(locality.task_policy());"
        "linux.set_mempolicy(linux.MPOL_BIND, [0]);"
        "print(locality.task_policy());"
        "linux.set_mempolicy(linux.MPOL_LOCAL);"
        "print(locality.task_policy())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["('default', ())", "('bind', (0,))", "('local', ())"]
