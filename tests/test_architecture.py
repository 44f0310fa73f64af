"""The layout the code promises (docs/architecture.md): layers that import downwards only, no import
circle, one reader of the machine, and integration code that is the only importer of composer."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "composer_numa"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every composer_numa module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t.startswith("composer_numa") and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_counting_imports_inside_functions():
    graph = _graph()
    # a package's __init__ re-exporting its modules is not a circle through them
    for name in list(graph):
        for child in list(graph[name]):
            if child.startswith(name + ".") and name in graph[child]:
                graph[child].discard(name)
    assert _cycles(graph) == []


# Lower layers never import higher ones (reading -> planning -> acting -> reporting/integrating).
_LAYERS = {
    "composer_numa.machine": {"composer_numa.plan", "composer_numa.binding", "composer_numa.report",
                              "composer_numa.cli", "composer_numa.composer", "composer_numa.offload"},
    "composer_numa.plan": {"composer_numa.binding", "composer_numa.report", "composer_numa.cli",
                           "composer_numa.composer", "composer_numa.offload"},
    "composer_numa.binding": {"composer_numa.report", "composer_numa.cli", "composer_numa.composer",
                              "composer_numa.offload"},
    "composer_numa.report": {"composer_numa.binding", "composer_numa.cli", "composer_numa.composer",
                             "composer_numa.offload"},
}


def test_layers_import_downwards_only():
    bad = []
    for name, deps in _graph().items():
        for layer, forbidden in _LAYERS.items():
            if name == layer or name.startswith(layer + "."):
                bad += [(name, d) for d in deps if any(d == f or d.startswith(f + ".") for f in forbidden)]
    assert bad == []


def test_only_the_composer_package_imports_composer():
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "composer" or n.startswith("composer.") for n in names):
                importers.append(path.relative_to(PACKAGE).parts[0])
    assert set(importers) <= {"composer"}


def test_the_extension_reads_no_sysfs_or_procfs_file():
    hits = [f"{p.name}: {line.strip()}" for p in (ROOT / "ext").rglob("*") if p.suffix in (".cpp", ".h")
            for line in p.read_text().splitlines() if '"/sys' in line or '"/proc' in line]
    assert hits == []


_INIT_PROBE = r"""
import builtins, io, json, os, sys
opened = []
real_open, real_os_open = builtins.open, os.open
def spy_open(file, *a, **k):
    opened.append(str(file)); return real_open(file, *a, **k)
def spy_os_open(path, *a, **k):
    opened.append(str(path)); return real_os_open(path, *a, **k)
from composer_numa.binding import linux
from composer_numa import NumaAffinity
before = (sorted(os.sched_getaffinity(0)), linux.get_mempolicy())
builtins.open, os.open = spy_open, spy_os_open
cb = NumaAffinity(mode="exclusive", memory="bind", memory_need="1G", worker_cores=1)
builtins.open, os.open = real_open, real_os_open
after = (sorted(os.sched_getaffinity(0)), linux.get_mempolicy())
print(json.dumps({"same": before == after, "opened": [p for p in opened if p.startswith(("/sys", "/proc"))],
                  "env": os.environ.get("COMPOSER_NUMA_BINDING")}))
"""


def test_the_callback_constructor_only_stores_its_options():
    env = {k: v for k, v in os.environ.items() if k not in ("COMPOSER_NUMA_BINDING", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", _INIT_PROBE], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"same": True, "opened": [], "env": None}


def test_the_callback_module_stays_small():
    lines = (PACKAGE / "composer" / "callback.py").read_text().splitlines()
    assert len(lines) < 480, len(lines)


_REGISTRY_HOSTS = ("pypi.org", "pythonhosted.org", "download.pytorch.org", "deb.debian.org", "security.debian.org",
                   "archive.ubuntu.com", "registry.npmjs.org", "ghcr.io", "docker.io", "quay.io", "anaconda.org")


def test_no_registry_host_is_named():
    """Packages come from wherever the installer is configured to get them: no host is named."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()
    hits = []
    for rel in listed:
        path = ROOT / rel
        if not path.is_file() or path.stat().st_size > 1 << 20:
            continue
        try:
            text = path.read_text().lower()
        except UnicodeDecodeError:
            continue
        hits += [f"{rel}: {host}" for host in _REGISTRY_HOSTS if host in text and rel != "tests/test_architecture.py"]
    assert hits == []
