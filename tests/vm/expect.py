"""Host-side assertions shared by the VM tests: the guest's view against the layout."""

from __future__ import annotations

from tests.vm.harness import Layout

MIB = 1 << 20


def memory_close(total_bytes: int, layout_mib: int) -> bool:
    """MemTotal is the node's RAM less what the kernel reserves there: page structures
    (~1.6 %) everywhere, and on the one node holding it a fixed ~45 MiB (DMA bounce buffers,
    low memory). So: at most the node's size, at least 15 % or 96 MiB less, whichever is more."""
    size = layout_mib * MIB
    return size - max(0.15 * size, 96 * MIB) <= total_bytes <= size


def assert_raw_matches(layout: Layout, raw: dict) -> None:
    """The guest kernel sees exactly the layout QEMU was given (proves the rig)."""
    exp = layout.expected()
    assert [n["id"] for n in raw["nodes"]] == list(range(len(layout.nodes)))
    for got, want in zip(raw["nodes"], exp["nodes"], strict=True):
        assert got["cpus"] == want["cpus"], (got, want)
        assert got["distances"] == want["distances"], (got, want)
        assert memory_close(got["memory_total_kb"] * 1024, want["memory_mib"]), (got, want)
    for s, cpus in exp["sockets"].items():
        assert [int(c) for c, sock in raw["socket_of_cpu"].items() if sock == s] == cpus
    for g in exp["gpus"]:
        dev = raw["pci"].get(g["pci_bus_id"])
        assert dev is not None, f"no PCI device {g['pci_bus_id']} in the guest: {sorted(raw['pci'])}"
        assert dev["class"] == "0x038000" and dev["numa_node"] == g["numa_node"], (g, dev)


def assert_discovered_matches(layout: Layout, disc: dict) -> None:
    """composer_numa.machine.topology.discover() in the guest gives back the layout exactly."""
    exp = layout.expected()
    assert [n["id"] for n in disc["nodes"]] == list(range(len(layout.nodes)))
    for got, want in zip(disc["nodes"], exp["nodes"], strict=True):
        assert got["cpus"] == want["cpus"], (got, want)
        assert got["distances"] == want["distances"], (got, want)
        assert memory_close(got["memory_total"], want["memory_mib"]), (got, want)
        assert 0 < got["memory_free"] <= got["memory_total"], got
    assert [c["id"] for c in disc["cpus"]] == list(range(layout.ncpus))
    for c in disc["cpus"]:
        assert c["node"] == layout.node_of(c["id"]), c
        assert c["socket"] == layout.socket_of(c["id"]), c
    assert [(g["index"], g["pci_bus_id"], g["numa_node"]) for g in disc["gpus"]] == \
        [(i, g["pci_bus_id"], g["numa_node"]) for i, g in enumerate(exp["gpus"])]
    assert disc["allowed_cpus"] == list(range(layout.ncpus))
    assert disc["allowed_mems"] == list(range(len(layout.nodes)))
    assert disc["numa_balancing"] is False  # the rig boots with numa_balancing=disable


def assert_report_matches(layout: Layout, report: dict, *, gpus: bool = True) -> None:
    """``composer-numa report --format json`` shows the layout (its GPU stand-ins unless
    ``gpus=False``), and plans no CPUs on CPU-less nodes."""
    exp = layout.expected()
    assert report["schema"] == 1
    assert [(n["id"], n["cpus"], n["distances"]) for n in report["nodes"]] == \
        [(n["id"], n["cpus"], n["distances"]) for n in exp["nodes"]]
    for got, want in zip(report["nodes"], exp["nodes"], strict=True):
        assert memory_close(got["memory_total_bytes"], want["memory_mib"]), (got, want)
    assert [(g["pci_bus_id"], g["numa_node"]) for g in report["gpus"]] == \
        [(g["pci_bus_id"], g["numa_node"]) for g in (exp["gpus"] if gpus else [])]
    cpu_nodes = {i for i, n in enumerate(layout.nodes) if n.cpus}
    for r in report["plan"]:
        assert r["cpus"], r
        assert {layout.node_of(c) for c in r["cpus"]} <= cpu_nodes, r


def fraction_on(pages: dict, nodes) -> float:
    total = sum(pages.values())
    return sum(pages.get(str(n), 0) for n in nodes) / total if total else 0.0


# plan's policy name -> what get_mempolicy(2) reports for it
_KERNEL_POLICY = {"preferred": ("preferred", "preferred-many"), "bind": ("bind",),
                  "interleave": ("interleave",), "local": ("local",), "none": ("default",)}


def assert_bound_as_planned(out: dict, *, cpus: list[int], policy: str, nodes: list[int]) -> None:
    """A process started by ``composer-numa exec`` (``out`` from guest/alloc.py) runs with the
    binding it was handed, and that binding is the one the layout implies."""
    b = out["binding"]
    assert b is not None, "COMPOSER_NUMA_BINDING was not exported"
    assert b["applied"]["not_applied"] == [], b["applied"]
    # what the planner decided, against the layout
    assert (b["cpus"], b["memory_policy"], b["memory_nodes"]) == (cpus, policy, nodes), b
    # what the kernel says the process has, against the plan
    assert out["affinity"] == cpus, out
    assert all(a == cpus for a in out["threads"].values()), out["threads"]
    assert out["mempolicy"]["mode"] in _KERNEL_POLICY[policy], out["mempolicy"]
    assert out["mempolicy"]["nodes"] == nodes, out["mempolicy"]


def assert_pages_on(out: dict, nodes, minimum: float = 0.95) -> float:
    """At least ``minimum`` of the touched allocation is resident on ``nodes``; returns the fraction."""
    assert out["vma_bytes"] == out["expected_pages"] * 4096 or out["vma_bytes"] > 0
    resident = sum(out["pages"].values())
    assert resident >= 0.99 * out["expected_pages"], f"only {resident} pages resident: {out}"
    frac = fraction_on(out["pages"], nodes)
    assert frac >= minimum, f"{frac:.3f} of the pages on nodes {list(nodes)}: {out['pages']}"
    return frac


def assert_interleaved(out: dict, nodes, tolerance: float = 0.10) -> dict[int, float]:
    """Pages spread over ``nodes`` within ``tolerance`` (relative) of an even share."""
    even = 1 / len(nodes)
    shares = {n: fraction_on(out["pages"], [n]) for n in nodes}
    assert sum(shares.values()) >= 0.95, out["pages"]
    for n, share in shares.items():
        assert abs(share - even) <= tolerance * even, f"node {n}: {share:.3f} vs {even:.3f}: {shares}"
    return shares
