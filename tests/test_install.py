"""Installing without a compiler, and running without the C++ extension.

* A wheel built here (``pip wheel . --no-deps``) installs with ``--no-deps`` into a fresh
  ``python -m venv`` without any compiler and runs ``composer-numa report`` and the
  extension's smoke test there.
* With ``composer_numa._C`` missing or unloadable, discovery, planning, ``report``, ``exec``,
  ``launch``, ``check`` and the ``NumaAffinity`` callback work; only the offload classes
  (``NumaAdamW``, ``NumaExperts``, node-local ``memory``) raise, with one error naming
  ``composer_numa._C``.

This file is also a script: ``python -m tests.test_install no-extension OUT.json`` runs the
in-process half of the second check (the extension blocked by a ``sitecustomize``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SCRUB = ("COMPOSER_NUMA_BINDING", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
          "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH")
# What pip prints when it cannot reach a package index (so the build requirements are out of reach).
_OFFLINE = ("Could not find a version that satisfies the requirement", "No matching distribution found",
            "NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
            "Failed to establish a new connection", "ConnectTimeoutError", "ProxyError")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(extra)
    return env


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 900)
    return subprocess.run(cmd, **kw)


def _failed(cmd: list[str], proc: subprocess.CompletedProcess) -> str:
    return f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


# ---------------------------------------------------------------------------------------------
# A wheel, installed into a fresh venv with no compiler
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_without_a_compiler(tmp_path):
    wheels, build = tmp_path / "wheels", tmp_path / "build"
    # build-dir elsewhere: the editable install's CMake tree under build/ is left alone
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(wheels),
           "--config-settings", f"build-dir={build}"]
    proc = _run(cmd, cwd=tmp_path, env=_env())
    if proc.returncode != 0 and any(s in proc.stdout + proc.stderr for s in _OFFLINE):
        pytest.skip("no package index reachable: pip wheel cannot fetch the build requirements "
                    "(scikit-build-core, nanobind)")
    assert proc.returncode == 0, _failed(cmd, proc)
    (wheel,) = wheels.glob("composer_numa-*.whl")

    # The wheel: the extension and the package, nothing from tests/ or the build tree, and a tag
    # that matches the module (an abi3 tag needs an .abi3.so, or other Pythons cannot load it).
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    modules = [n for n in names if n.startswith("composer_numa/_C.") and n.endswith(".so")]
    assert len(modules) == 1, names
    assert not any(n.startswith(("tests/", "build/", "ext/")) for n in names)
    tag = wheel.name.split("-")[-2:]
    if tag[0] == "abi3":
        assert modules[0].endswith(".abi3.so"), f"{wheel.name} is tagged abi3 but holds {modules[0]}"
    else:
        assert modules[0].endswith(sysconfig.get_config_var("EXT_SUFFIX")), modules
    assert "composer-numa = composer_numa.cli:main" in entry_points
    assert "numa_affinity = composer_numa.composer.callback:NumaAffinity" in entry_points
    assert "numa_adamw = composer_numa.offload.optim:NumaAdamW" in entry_points

    # A fresh venv, the wheel alone (--no-deps: no torch, no Composer), and no compiler anywhere:
    # binary only, and CC/CXX pointing at a program that fails.
    venv = tmp_path / "venv"
    proc = _run([sys.executable, "-m", "venv", str(venv)], env=_env())
    assert proc.returncode == 0, proc.stderr
    py = venv / "bin" / "python"
    no_compiler = _env(CC="false", CXX="false", PIP_ONLY_BINARY=":all:")
    cmd = [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--only-binary=:all:", str(wheel)]
    proc = _run(cmd, cwd=tmp_path, env=no_compiler)
    assert proc.returncode == 0, _failed(cmd, proc)

    outside = tmp_path / "elsewhere"  # not the checkout: the installed package must be the one imported
    outside.mkdir()
    where = _run([str(py), "-c", "import composer_numa, sys; print(composer_numa.__file__); "
                  "assert 'torch' not in sys.modules"], cwd=outside, env=_env())
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    cmd = [str(venv / "bin" / "composer-numa"), "report"]
    proc = _run(cmd, cwd=outside, env=_env())
    assert proc.returncode == 0, _failed(cmd, proc)
    assert proc.stdout.startswith("composer-numa ") and "NUMA nodes" in proc.stdout and "Plan (" in proc.stdout
    cmd = [str(venv / "bin" / "composer-numa"), "report", "--format", "json"]
    proc = _run(cmd, cwd=outside, env=_env())
    assert proc.returncode == 0 and json.loads(proc.stdout)["schema"] == 1, _failed(cmd, proc)

    cmd = [str(py), "-c", "import composer_numa._C as c; print(c.cpu_features())"]
    proc = _run(cmd, cwd=outside, env=_env())
    assert proc.returncode == 0, _failed(cmd, proc)
    features = proc.stdout.strip()
    assert features.startswith("{") and features.endswith("}"), features
    # the same CPU features the checkout's build reports (one wheel, any CPU: chosen at run time)
    here = _run([sys.executable, "-c", "import composer_numa._C as c; print(c.cpu_features())"], env=_env())
    if here.returncode == 0:
        assert features == here.stdout.strip()


# ---------------------------------------------------------------------------------------------
# Everything but the offload classes works without the extension
# ---------------------------------------------------------------------------------------------

# Installed as sitecustomize.py (on PYTHONPATH), so every process started during the check,
# exec'd ranks included, sees composer_numa._C missing or broken.
_BLOCKER = '''
import importlib.abc, os, sys


class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "composer_numa._C":
            return None
        if os.environ.get("COMPOSER_NUMA_TEST_EXT") == "broken":
            raise ImportError("{so}: undefined symbol: _ZN2nb6detail10nb_func_newEPKv", name=name)
        raise ModuleNotFoundError("No module named 'composer_numa._C'", name=name)


sys.meta_path.insert(0, _NoExtension())
'''


def scenario_no_extension(out: str) -> None:
    """In-process: the callback trains, discovery and planning work, the offload classes raise."""
    import warnings

    import torch

    result: dict = {}
    try:
        import composer_numa._C  # noqa: F401
        result["extension"] = "loaded"
    except ImportError as e:
        result["extension"] = f"{type(e).__name__}: {e}"

    from composer_numa import PlanOptions, discover
    from composer_numa.plan import plan

    topo = discover()
    result["plan"] = [r.to_json() for r in plan(topo, PlanOptions(nproc=1)).ranks]

    from composer_numa import NumaAffinity
    from tests.composer.test_callback import _train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = _train(NumaAffinity(), duration="2ba")
    result["trained"] = {"batches": trained["batches"], "hparams": trained["hparams"],
                         "affinity": trained["affinity"]}
    result["warnings"] = sorted({str(w.message) for w in caught if "composer_numa" in str(w.message)})

    errors = {}
    p = torch.nn.Parameter(torch.zeros(4))
    attempts = {
        "NumaAdamW": lambda: __import__("composer_numa").NumaAdamW([p], lr=1e-3).step(),
        "NumaExperts": lambda: __import__("composer_numa").NumaExperts.from_dense(
            torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), torch.zeros(2, 8, 4)),
        "memory.empty": lambda: __import__("composer_numa.offload.memory", fromlist=["empty"]).empty(
            (16,), torch.float32, node=0),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except Exception as e:  # the test checks which type it is
            errors[name] = {"type": type(e).__name__, "mro": [c.__name__ for c in type(e).__mro__],
                            "message": str(e)}
    result["errors"] = errors
    Path(out).write_text(json.dumps(result))


@pytest.fixture(params=["missing", "broken"])
def no_extension_env(request, tmp_path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    so = f"composer_numa/_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    (site / "sitecustomize.py").write_text(textwrap.dedent(_BLOCKER).replace("{so}", so))
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]), COMPOSER_NUMA_TEST_EXT=request.param,
               PYTHONWARNINGS="ignore::UserWarning:torch.utils.data.dataloader")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "composer_numa.cli", *args]


@pytest.mark.slow
def test_without_the_extension_only_the_offload_classes_fail(no_extension_env, tmp_path):
    env = no_extension_env
    probe = _run([sys.executable, "-c", "import composer_numa._C"], env=env, cwd=ROOT)
    assert probe.returncode != 0 and "composer_numa" in probe.stderr and "_C" in probe.stderr

    # report, in every format
    for fmt in ("table", "json", "markdown", "svg"):
        proc = _run(_cli("report", "--format", fmt), env=env, cwd=ROOT)
        assert proc.returncode == 0, _failed(_cli("report", "--format", fmt), proc)
        assert "Traceback" not in proc.stderr
    # exec binds and runs the command; check verifies that binding (exit 0: it holds)
    cmd = _cli("exec", "--local-rank", "0", "--nproc", "1", "--", *_cli("check", "--format", "json"))
    proc = _run(cmd, env=env, cwd=ROOT)
    assert proc.returncode == 0, _failed(cmd, proc)
    checked = json.loads(proc.stdout)
    assert checked and "Traceback" not in proc.stderr
    # launch: Composer's launcher, one rank bound at birth, training with the callback
    reports = tmp_path / "reports"
    cmd = _cli("launch", "-n", "1", "--master_port", str(_free_port()), "examples/train.py", "--steps", "2",
               "--report-dir", str(reports))
    proc = _run(cmd, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, _failed(cmd, proc)
    rank0 = json.loads((reports / "rank0.json").read_text())
    assert rank0["batches"] == 2 and rank0["numa"]["numa/bound_at"] == "launch"

    # in-process: the callback trains and binds; discovery and planning work; offload classes raise
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "tests.test_install", "no-extension", str(out)]
    proc = _run(cmd, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, _failed(cmd, proc)
    r = json.loads(out.read_text())
    assert r["extension"].startswith(("ModuleNotFoundError", "ImportError"))
    assert r["plan"] and r["plan"][0]["cpus"]
    assert r["trained"]["batches"] == 2
    assert r["trained"]["hparams"]["numa/bound_at"] == "callback"
    assert r["trained"]["hparams"]["numa/cpus"]
    assert not [w for w in r["warnings"] if "_C" in w], r["warnings"]
    for name, err in r["errors"].items():
        assert err is not None, f"{name} worked without the extension"
        assert "NativeExtensionError" in err["mro"] and "ImportError" in err["mro"], (name, err)
        assert "composer_numa._C" in err["message"], (name, err)
        assert "Traceback" not in err["message"] and "\n" not in err["message"], (name, err)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    {"no-extension": scenario_no_extension}[sys.argv[1]](sys.argv[2])
