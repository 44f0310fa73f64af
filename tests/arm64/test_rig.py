"""The arm64 rig itself (tests/arm64/harness.py).

The quick tests check the rig's pure parts on any host. The end-to-end ones build the arm64
root (minutes and ~2 GB on first use) and so run only with ``COMPOSER_NUMA_ARM64=1``.
"""

from __future__ import annotations

import os
import platform

import pytest

from tests.arm64 import harness


def test_requirements_are_the_projects_plus_the_rigs():
    reqs = harness.requirements()
    assert f"torch=={harness.TORCH}" in reqs
    assert any(r.startswith("nanobind") for r in reqs)
    assert any(r.startswith("scikit-build-core") for r in reqs)
    if os.environ.get("COMPOSER_NUMA_ARM64_PROJECT_DEPS", "1") != "0":
        assert any(r.startswith("mosaicml") for r in reqs)
    assert not any(r.startswith("ruff") for r in reqs)


def test_deb_file_names_encode_the_epoch():
    path = harness._deb_file("python3.11", "1:3.11.2-6+deb12u6", "arm64")
    assert path.name == "python3.11_1%3a3.11.2-6+deb12u6_arm64.deb"


def test_binfmt_magic_is_the_aarch64_elf_header():
    raw = bytes(int(x, 16) for x in harness._MAGIC_ESC.split(r"\x")[1:])
    assert raw.hex() == harness.AARCH64_MAGIC
    assert raw[:4] == b"\x7fELF" and raw[18] == 0xB7  # EM_AARCH64
    assert len(harness._MASK_ESC.split(r"\x")) == len(harness._MAGIC_ESC.split(r"\x"))


def test_rig_files_exist():
    assert harness.TOOLCHAIN.is_file()
    assert (harness.STANDIN / "CMakeLists.txt").is_file()


# --------------------------------------------------------------------------- end to end


def _e2e_skip_reason() -> str | None:
    if os.environ.get("COMPOSER_NUMA_ARM64_EMULATED") or platform.machine() == "aarch64":
        return "already inside the arm64 root"
    if not harness.required():
        return "set COMPOSER_NUMA_ARM64=1 to build and use the arm64 root (minutes, ~2 GB on first use)"
    return harness.unavailable_reason()


e2e = pytest.mark.skipif(_e2e_skip_reason() is not None, reason=str(_e2e_skip_reason()))


@e2e
@pytest.mark.slow
def test_commands_run_as_aarch64_and_see_the_checkout():
    r = harness.run(["python", "-c", "import os, platform; print(platform.machine(), os.getcwd())"],
                    cwd=harness.REPO, capture=True)
    assert r.returncode == 0, r.stdout
    assert r.stdout.split()[-2:] == ["aarch64", str(harness.REPO)]


@e2e
@pytest.mark.slow
def test_subprocesses_of_arm64_python_are_arm64_too():
    code = ("import subprocess, sys; print(subprocess.run([sys.executable, '-c', "
            "'import platform; print(platform.machine())'], capture_output=True, text=True).stdout.strip())")
    r = harness.run(["python", "-c", code], capture=True)
    assert r.returncode == 0, r.stdout
    assert r.stdout.split()[-1] == "aarch64"


@e2e
@pytest.mark.slow
def test_standin_extension_cross_builds_and_imports():
    harness.build(harness.STANDIN, "cross")
    code = ("import numpy as np, _arm64_standin as m; "
            "print(m.arch(), m.vsum(np.arange(10, dtype=np.float32)), m.threaded_sum(100))")
    r = harness.run(["python", "-c", code], capture=True)
    assert r.returncode == 0, r.stdout
    assert r.stdout.split()[-3:] == ["aarch64", "45.0", "5050"]


def test_the_arm64_selection_names_existing_files():
    from tests import conftest

    for name in conftest._ARM64_FILES:
        assert (conftest._TESTS_DIR / name).exists(), f"tests/conftest.py _ARM64_FILES names a missing {name}"


@e2e
@pytest.mark.slow
def test_extension_cross_builds_and_reports_neon():
    """The project's own extension for aarch64 (the CI step runs all of ``-m arm64``; this is its smoke)."""
    harness.build(harness.REPO, "cross")
    code = "import composer_numa._C as C; f = C.cpu_features(); print(C.simd_level(), f['asimd'], f['avx2'])"
    r = harness.run(["python", "-c", code], capture=True, env={"COMPOSER_NUMA_SIMD": ""})
    assert r.returncode == 0, r.stdout
    assert r.stdout.split()[-3:] == ["neon", "True", "False"]
