#!/usr/bin/env python3
"""arm64 (aarch64, NVIDIA Grace) rig: a Debian arm64 root run under qemu-user emulation.

CI machines are x86-64. This rig builds a Debian bookworm arm64 root under
``tests/arm64/.cache`` and runs commands in it with ``chroot``: the kernel hands every
aarch64 ELF, including those a test spawns (``sys.executable -m composer_numa.cli ...``),
to ``qemu-aarch64-static`` through a binfmt_misc handler registered with the F flag, so the
handler works inside the chroot with no qemu binary there.

How the root is made, fast and without running anything emulated that need not be:

* Debian packages (python3, python3-venv, python3-dev, g++ ...) are resolved and downloaded by
  the host's ``apt-get`` with a private state directory (``APT::Architecture=arm64``), then
  unpacked with ``dpkg-deb`` into a merged-/usr tree. No maintainer scripts run (nothing in
  them matters for a build-and-test root), so no emulated ``dpkg --configure``.
* PyPI wheels are resolved by pip running *inside* the root (pip evaluates environment markers
  against the interpreter running it, so only an aarch64 pip picks the right dependencies), then
  installed by the host's pip with ``--target`` into a venv at ``/opt/arm64-venv`` of the root.
  The resolved file list is kept, so a later setup is offline.
* The checkout is bind-mounted at its own path, so paths match inside and out; ``/proc``,
  ``/sys``, ``/dev`` and a fresh ``/tmp`` are mounted in a private mount namespace
  (``unshare --mount``) that vanishes with the command.

The extension is built either by cross-compiling on the host (Debian's
``g++-aarch64-linux-gnu``, the root as sysroot, ``aarch64-linux-gnu.cmake``) into an editable
wheel that the root's pip installs, or natively under emulation (``pip install -e`` in the
root). Cross is the default: see README.md for the timings.

Commands::

    python tests/arm64/harness.py setup
    python tests/arm64/harness.py run -- python -c 'import platform; print(platform.machine())'
    python tests/arm64/harness.py build [--mode cross|native] [--project DIR]
    python tests/arm64/harness.py test [--mode cross|native] [-- PYTEST ARGS]   (default: -m arm64)
    python tests/arm64/harness.py syntax [FILES]      (aarch64 g++ -fsyntax-only over ext/**/*.cpp)
    python tests/arm64/harness.py info

Environment:

* ``COMPOSER_NUMA_ARM64=0`` turns the rig off (every command skips); ``=1`` makes a missing
  prerequisite an error (exit 1) instead of a skip (exit 0 with one ``SKIP`` line).
* ``COMPOSER_NUMA_ARM64_CACHE=DIR`` moves the cache (default ``tests/arm64/.cache``).
* ``COMPOSER_NUMA_ARM64_TORCH=VER`` torch version (default 2.7.0: mosaicml 0.32, a dependency of
  the project, requires torch<2.7.1; with ``COMPOSER_NUMA_ARM64_PROJECT_DEPS=0`` any 2.x works).
* ``COMPOSER_NUMA_ARM64_PROJECT_DEPS=0`` leaves the project's runtime dependencies (mosaicml ...)
  out of the venv.
* ``COMPOSER_NUMA_ARM64_MIRROR`` / ``COMPOSER_NUMA_ARM64_SECURITY_MIRROR`` Debian mirrors.
* ``COMPOSER_NUMA_ARM64_MODE=cross|native`` default build mode.
* ``QEMU_CPU`` the emulated CPU (default ``max,sve-default-vector-length=16``: Grace's 128-bit SVE).

Needs: Linux, root, apt-get and dpkg-deb (Debian/Ubuntu host), unshare and chroot
(util-linux, coreutils); on x86-64 also a writable binfmt_misc and ``qemu-user-static``, which
``setup`` installs with apt-get when missing, as it does ``g++-aarch64-linux-gnu`` for cross
builds. Everything but the host packages lives in the cache directory.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("COMPOSER_NUMA_ARM64_CACHE") or HERE / ".cache").resolve()
ROOTFS = CACHE / "rootfs"
TOOLCHAIN = HERE / "aarch64-linux-gnu.cmake"
STANDIN = HERE / "standin"

SUITE = "bookworm"


def _host_mirrors() -> tuple[str, str]:
    """The Debian archive and security URIs this host's apt already uses (deb822 or one-line
    sources), so the arm64 root comes from wherever the host gets its packages."""
    main = security = ""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
             *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri, suites in re.findall(r"^URIs:\s*(\S+)\s*\nSuites:\s*([^\n]+)", text, flags=re.M) + [
                (m[0], m[1]) for m in re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, flags=re.M)]:
            if f"{SUITE}-security" in suites.split():
                security = security or uri
            elif SUITE in suites.split():
                main = main or uri
    return main, security


_MAIN, _SECURITY = _host_mirrors()
MIRROR = os.environ.get("COMPOSER_NUMA_ARM64_MIRROR") or _MAIN
SECURITY_MIRROR = os.environ.get("COMPOSER_NUMA_ARM64_SECURITY_MIRROR") or _SECURITY
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
PY = "3.11"  # bookworm's python3
SOABI = f"cpython-{PY.replace('.', '')}-aarch64-linux-gnu"
VENV = "/opt/arm64-venv"  # inside the root
TORCH = os.environ.get("COMPOSER_NUMA_ARM64_TORCH", "2.7.0")

#: Debian packages of the root (their dependencies come along). No maintainer scripts run.
DEBS = (
    "base-files", "base-passwd", "bash", "coreutils", "dash", "diffutils", "findutils", "grep",
    "gzip", "sed", "tar", "util-linux", "mount", "procps", "libc-bin", "ncurses-base",
    "python3", "python3-venv", "python3-dev", "g++", "make",
)
#: Excluded when unpacking: documentation and translations nobody reads in a CI root.
DEB_EXCLUDES = ("./usr/share/doc/*", "./usr/share/man/*", "./usr/share/info/*", "./usr/share/locale/*",
                "./usr/share/lintian/*")
#: PyPI packages of the venv besides the project's own dependencies.
BASE_WHEELS = ("pip", f"torch=={TORCH}", "numpy", "pytest", "hypothesis", "nanobind>=2.0",
               "scikit-build-core>=0.10", "cmake>=3.18", "ninja")
#: Platforms the host pip accepts when installing the resolved aarch64 wheels.
WHEEL_PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_35_aarch64", "manylinux_2_34_aarch64",
                   "manylinux_2_31_aarch64", "manylinux_2_28_aarch64", "manylinux_2_27_aarch64",
                   "manylinux_2_26_aarch64", "manylinux_2_24_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64", "linux_aarch64")
#: The emulated CPU unless QEMU_CPU says otherwise: every feature qemu has (SVE2 among them) with
#: NVIDIA Grace's (Neoverse V2) 128-bit SVE vectors instead of qemu's default 512.
QEMU_CPU = "max,sve-default-vector-length=16"
#: The aarch64 ELF header as binfmt_misc matches it (as Debian's qemu-user-static registers it).
AARCH64_MAGIC = "7f454c460201010000000000000000000200b700"
_MAGIC_ESC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK_ESC = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
BINFMT = Path("/proc/sys/fs/binfmt_misc")
#: Host executables and the Debian packages that provide them.
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
#: Host environment variables handed to commands in the root.
PASS_ENV = re.compile(r"^(COMPOSER_NUMA_.*|PYTEST_.*|HYPOTHESIS_.*|QEMU_CPU|CI|TERM|COLUMNS|NO_COLOR|FORCE_COLOR|"
                      r"[Hh][Tt][Tt][Pp][Ss]?_[Pp][Rr][Oo][Xx][Yy]|[Nn][Oo]_[Pp][Rr][Oo][Xx][Yy])$")


class Unavailable(Exception):
    """A prerequisite is missing: the rig skips (or fails under COMPOSER_NUMA_ARM64=1) with this reason."""


class RigError(Exception):
    """Something the rig tried failed (download, build): always an error."""


def log(msg: str) -> None:
    print(f"arm64: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- helpers


def _sh(cmd: Sequence[str | os.PathLike], *, check: bool = True, capture: bool = False,
        env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        quiet: bool = False) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    if not quiet:
        shown = shlex.join(cmd[:24]) + (f" ... ({len(cmd) - 24} more)" if len(cmd) > 24 else "")
        log("$ " + shown)
    r = subprocess.run(cmd, env=env, cwd=cwd, text=True,
                       stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.STDOUT if capture else None)
    if check and r.returncode != 0:
        tail = ("\n" + r.stdout[-4000:]) if capture and r.stdout else ""
        raise RigError(f"command failed ({r.returncode}): {shlex.join(cmd)}{tail}")
    return r


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


@contextmanager
def _locked() -> Iterator[None]:
    """One setup/build at a time per cache directory."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _emulated() -> bool:
    return platform.machine() not in ("aarch64", "arm64")


def _host_python_matches() -> bool:
    return sys.implementation.name == "cpython" and f"{sys.version_info[0]}.{sys.version_info[1]}" == PY


def _clean_host_env(**extra: str) -> dict[str, str]:
    """The host's environment without pip configuration (a CI's find-links or constraints)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_ROOT_USER_ACTION"] = "ignore"
    env.update(extra)
    return env


# --------------------------------------------------------------------------- prerequisites


def _mode_setting() -> str:
    return os.environ.get("COMPOSER_NUMA_ARM64", "").strip().lower()


def disabled_reason() -> str | None:
    if _mode_setting() in ("0", "no", "off", "false"):
        return "COMPOSER_NUMA_ARM64=0"
    return None


def required() -> bool:
    return _mode_setting() in ("1", "yes", "on", "true", "required")


def unavailable_reason() -> str | None:
    """Why the rig cannot run on this host (cheap checks, nothing installed); None when it can."""
    reason = disabled_reason()
    if reason:
        return reason
    if sys.platform != "linux":
        return f"the arm64 rig needs Linux (this is {sys.platform})"
    if platform.machine() not in ("x86_64", "aarch64", "arm64"):
        return f"the arm64 rig supports x86-64 and aarch64 hosts (this is {platform.machine()})"
    if os.geteuid() != 0:
        return "the arm64 rig needs root (chroot, mounts, binfmt_misc)"
    for tool in ("apt-get", "dpkg-deb", "tar", "unshare", "chroot", "mount"):
        if not shutil.which(tool):
            return f"`{tool}` is missing (the arm64 rig needs a Debian or Ubuntu host)"
    if not KEYRING.is_file():
        return f"{KEYRING} is missing (apt-get install debian-archive-keyring)"
    if not MIRROR or not SECURITY_MIRROR:
        return (f"this host's apt sources name no Debian {SUITE} archive (set COMPOSER_NUMA_ARM64_MIRROR "
                "and COMPOSER_NUMA_ARM64_SECURITY_MIRROR)")
    if _emulated() and not shutil.which("qemu-aarch64-static") and not Path("/proc/sys/fs/binfmt_misc").exists():
        return "no binfmt_misc in this kernel (/proc/sys/fs/binfmt_misc is missing)"
    return None


_apt_updated = False


def ensure_host_packages(tools: Sequence[str]) -> None:
    """Install the Debian packages that provide ``tools`` when they are missing (root only)."""
    global _apt_updated
    missing = sorted({HOST_TOOLS[t] for t in tools if not shutil.which(t)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
    log(f"installing host packages {' '.join(missing)}")
    if _sh(cmd, env=env, check=False, capture=True).returncode != 0:
        if not _apt_updated:
            _sh(["apt-get", "update", "-qq"], env=env, check=False, capture=True)
            _apt_updated = True
        r = _sh(cmd, env=env, check=False, capture=True)
        if r.returncode != 0:
            raise Unavailable(f"could not apt-get install {' '.join(missing)}: {r.stdout.strip().splitlines()[-1:]}")
    still = [t for t in tools if not shutil.which(t)]
    if still:
        raise Unavailable(f"{', '.join(still)} still missing after installing {' '.join(missing)}")


# --------------------------------------------------------------------------- binfmt_misc


def _binfmt_entries() -> dict[str, dict]:
    out = {}
    for entry in BINFMT.iterdir():
        if entry.name in ("register", "status"):
            continue
        info: dict = {"enabled": False, "flags": "", "interpreter": "", "magic": ""}
        try:
            lines = entry.read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line in ("enabled", "disabled"):
                info["enabled"] = line == "enabled"
            elif line.startswith("interpreter "):
                info["interpreter"] = line.split(" ", 1)[1]
            elif line.startswith("flags:"):
                info["flags"] = line.split(":", 1)[1].strip()
            elif line.startswith("magic "):
                info["magic"] = line.split(" ", 1)[1]
        out[entry.name] = info
    return out


def ensure_binfmt() -> dict | None:
    """Make sure the kernel runs aarch64 ELF files through qemu; returns the handler (None: native host).

    Uses an enabled handler when one exists (registered by binfmt-support, systemd-binfmt or
    docker's tonistiigi/binfmt), else registers Debian's ``qemu-aarch64`` line with the F flag
    (the kernel opens the interpreter now, so it works inside any chroot).
    """
    if not _emulated():
        return None
    if not (BINFMT / "register").exists():
        r = _sh(["mount", "-t", "binfmt_misc", "binfmt_misc", BINFMT], check=False, capture=True, quiet=True)
        if r.returncode != 0 or not (BINFMT / "register").exists():
            why = r.stdout.strip() or "no register file"
            raise Unavailable(f"binfmt_misc is not mounted and cannot be mounted: {why}")
    if (BINFMT / "status").read_text().strip() != "enabled":
        raise Unavailable("binfmt_misc is globally disabled (/proc/sys/fs/binfmt_misc/status)")
    for name, info in _binfmt_entries().items():
        if info["enabled"] and info["magic"] == AARCH64_MAGIC:
            return {"name": name, **info}
    ensure_host_packages(["qemu-aarch64-static"])
    conf = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
    line = ""
    if conf.is_file():
        line = conf.read_text().strip()
        fields = line.split(":")  # "", name, type, offset, magic, mask, interpreter, flags
        if len(fields) == 8 and Path(fields[6]).exists():
            if "F" not in fields[7]:
                fields[7] += "F"
            line = ":".join(fields)
        else:
            line = ""
    if not line:  # no Debian file: plain qemu-aarch64-static (no P flag: it would not expect argv[0])
        qemu = shutil.which("qemu-aarch64-static")
        line = f":qemu-aarch64:M::{_MAGIC_ESC}:{_MASK_ESC}:{qemu}:F"
    name = line.split(":")[1]
    if (BINFMT / name).exists():  # a disabled entry of that name: replace it
        try:
            (BINFMT / name).write_text("-1")
        except OSError as e:
            raise Unavailable(f"cannot remove the disabled binfmt_misc entry {name}: {e}") from e
    try:
        (BINFMT / "register").write_text(line)
    except OSError as e:
        raise Unavailable(f"binfmt_misc is not writable here ({e}); register qemu-aarch64 on the host "
                          "(e.g. docker run --privileged tonistiigi/binfmt --install arm64)") from e
    log(f"registered binfmt_misc handler {name}")
    info = _binfmt_entries().get(name)
    if not info or not info["enabled"]:
        raise Unavailable(f"binfmt_misc handler {name} did not register")
    return {"name": name, **info}


def _place_interpreter(handler: dict | None) -> None:
    """Without the F flag the kernel opens the interpreter inside the chroot: put a copy there."""
    if not handler or "F" in handler["flags"]:
        return
    src = Path(handler["interpreter"]).resolve()
    dst = ROOTFS / handler["interpreter"].lstrip("/")
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink():
            dst.unlink()
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- Debian root


def _apt_dir() -> Path:
    return CACHE / "apt"


def _apt_opts() -> list[str]:
    d = _apt_dir()
    opts = {
        "Dir::Etc::SourceList": d / "sources.list",
        "Dir::Etc::SourceParts": d / "sources.list.d",
        "Dir::Etc::Preferences": d / "preferences",
        "Dir::Etc::PreferencesParts": d / "preferences.d",
        "Dir::State": d / "state",
        "Dir::State::status": d / "state" / "status",
        "Dir::Cache": d / "cache",
        "Dir::Cache::archives": CACHE / "debs",
        "APT::Architecture": "arm64",
        "APT::Architectures": "arm64",
        "APT::Install-Recommends": "false",
        "APT::Install-Suggests": "false",
        "Acquire::Languages": "none",
        "Debug::NoLocking": "true",
    }
    out = []
    for k, v in opts.items():
        out += ["-o", f"{k}={v}"]
    return out


def _prepare_apt_dir() -> None:
    d = _apt_dir()
    for sub in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (CACHE / "debs" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "state" / "status").touch()
    opts = f"[arch=arm64 signed-by={KEYRING}]"
    (d / "sources.list").write_text(
        f"deb {opts} {MIRROR} {SUITE} main\n"
        f"deb {opts} {MIRROR} {SUITE}-updates main\n"
        f"deb {opts} {SECURITY_MIRROR} {SUITE}-security main\n")


def _deb_plan() -> list[tuple[str, str, str]]:
    """(package, version, arch) of everything DEBS needs, from apt's simulation."""
    r = _sh(["apt-get", *_apt_opts(), "install", "-s", *DEBS], capture=True, quiet=True)
    plan = []
    for line in r.stdout.splitlines():
        m = re.match(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)", line)
        if m:
            name, version, arch = m.groups()
            plan.append((name.split(":")[0], version, arch))
    if not plan:
        raise RigError("apt resolved no packages:\n" + r.stdout[-2000:])
    return plan


def _deb_file(name: str, version: str, arch: str) -> Path:
    return CACHE / "debs" / f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def fetch_debs() -> list[Path]:
    """Resolve and download the root's .debs into the cache; offline works once they are there."""
    _prepare_apt_dir()
    stamp = _apt_dir() / "plan.json"
    key = _digest(DEBS, MIRROR, SECURITY_MIRROR, SUITE)
    cached = _read_json(stamp)
    if cached.get("key") == key:
        files = [Path(f) for f in cached["files"]]
        if all(f.is_file() for f in files):
            return files
    r = _sh(["apt-get", *_apt_opts(), "-qq", "update"], check=False, capture=True)
    if r.returncode != 0:
        if not any((_apt_dir() / "state" / "lists").glob("*Packages*")):
            raise RigError("apt-get update for arm64 failed and no package lists are cached:\n" + r.stdout[-2000:])
        log("warning: apt-get update failed; using the cached arm64 package lists")
    plan = _deb_plan()
    files = [_deb_file(*p) for p in plan]
    if not all(f.is_file() for f in files):
        _sh(["apt-get", *_apt_opts(), "-y", "-qq", "install", "--download-only", *DEBS], capture=True)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RigError(f"apt downloaded, yet these are missing: {missing[:5]}")
    _write_json(stamp, {"key": key, "files": [str(f) for f in files]})
    return files


def _unpack(debs: Sequence[Path], root: Path) -> None:
    for sub in ("usr/bin", "usr/sbin", "usr/lib"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for top in ("bin", "sbin", "lib"):  # merged /usr, as bookworm's debootstrap makes it
        (root / top).symlink_to(f"usr/{top}")
    excludes = [f"--exclude={e}" for e in DEB_EXCLUDES]
    for deb in debs:
        dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(root), "--keep-directory-symlink", "--wildcards",
                              *excludes, "-f", "-"], stdin=dpkg.stdout)
        dpkg.stdout.close()
        if dpkg.wait() != 0 or tar.returncode != 0:
            raise RigError(f"could not unpack {deb.name}")
    # What maintainer scripts would have done, as far as a build-and-test root needs it.
    etc = root / "etc"
    for name in ("passwd", "group"):
        master = root / "usr/share/base-passwd" / f"{name}.master"
        if master.is_file() and not (etc / name).exists():
            shutil.copy(master, etc / name)
    for d in ("proc", "sys", "dev", "tmp", "root", "run", "var/tmp", "etc/ssl/certs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    os.chmod(root / "var/tmp", 0o1777)
    for cmd in ("cc", "c++"):  # update-alternatives links that gcc's/g++'s postinst would make
        target = {"cc": "gcc", "c++": "g++"}[cmd]
        link = root / "usr/bin" / cmd
        if (root / "usr/bin" / target).exists() and not link.exists():
            link.symlink_to(target)
    (root / "etc/debian_chroot").write_text("arm64\n")


def _rootfs_key() -> str:
    return _digest(DEBS, DEB_EXCLUDES, MIRROR, SUITE, 2)


def ensure_rootfs(handler: dict | None) -> bool:
    """Build the root when it is missing or its package set changed; True when it was (re)built."""
    stamp = _read_json(ROOTFS / ".rig-rootfs.json")
    if stamp.get("key") == _rootfs_key() and (ROOTFS / "usr/bin" / f"python{PY}").exists():
        return False
    t0 = time.monotonic()
    debs = fetch_debs()
    log(f"{len(debs)} .debs ready in {time.monotonic() - t0:.0f}s; unpacking")
    tmp = CACHE / "rootfs.new"
    _rmtree(tmp)
    tmp.mkdir(parents=True)
    _unpack(debs, tmp)
    _rmtree(ROOTFS)
    tmp.rename(ROOTFS)
    _place_interpreter(handler)
    r = _chroot(["/sbin/ldconfig"], capture=True)
    if r.returncode != 0:
        if r.returncode == 126 or "exec format error" in r.stdout.lower():
            raise Unavailable(f"cannot execute aarch64 programs (binfmt/qemu): {r.stdout.strip()[-300:]}")
        raise RigError(f"the first command in the new root failed: {r.stdout.strip()[-1000:]}")
    _write_json(ROOTFS / ".rig-rootfs.json", {"key": _rootfs_key(), "debs": len(debs),
                                              "seconds": round(time.monotonic() - t0, 1)})
    log(f"arm64 root ready in {time.monotonic() - t0:.0f}s")
    return True


# --------------------------------------------------------------------------- venv


def _project_requirements() -> list[str]:
    """The project's runtime dependencies and test extra (ruff left out), from pyproject.toml."""
    if os.environ.get("COMPOSER_NUMA_ARM64_PROJECT_DEPS", "1").strip() in ("0", "no", "off", "false"):
        return []
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib
        data = tomllib.loads(text)
        reqs = list(data.get("project", {}).get("dependencies", []))
        reqs += data.get("project", {}).get("optional-dependencies", {}).get("test", [])
    except ImportError:  # Python 3.10: the arrays are simple enough for a pattern
        reqs = []
        for key in ("dependencies", "test"):
            m = re.search(rf"^{key}\s*=\s*\[(.*?)\]", text, re.S | re.M)
            if m:
                reqs += re.findall(r'"([^"]+)"', m.group(1))
    return [r for r in reqs if not re.match(r"^ruff\b", r)]


def requirements() -> list[str]:
    return list(BASE_WHEELS) + _project_requirements()


def _pip_wheel_in_root() -> str:
    """Debian's pip wheel in the root (python3-venv brings it); pip runs straight from it."""
    found = sorted((ROOTFS / "usr/share/python-wheels").glob("pip-*.whl"))
    if not found:
        raise RigError("no pip wheel in the root's /usr/share/python-wheels")
    return "/" + str(found[-1].relative_to(ROOTFS))


def resolve_wheels(reqs: Sequence[str]) -> list[Path]:
    """Download the aarch64 wheels ``reqs`` need, resolved by pip inside the root; cached by requirement set."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    lock = wheels / f"lock-{_digest(sorted(reqs))}.txt"
    if lock.is_file():
        files = [wheels / n for n in lock.read_text().split()]
        if files and all(f.is_file() for f in files):
            return files
    reqfile = wheels / "requirements.txt"
    reqfile.write_text("\n".join(reqs) + "\n")
    t0 = time.monotonic()
    log(f"resolving {len(reqs)} requirements with pip inside the root (emulated)")
    r = _chroot(["/usr/bin/python3", _pip_wheel_in_root() + "/pip", "download", "--no-cache-dir",
                 "--only-binary=:all:", "--progress-bar", "off", "-d", str(wheels), "-r", str(reqfile)],
                capture=True)
    if r.returncode != 0:
        raise RigError("pip download in the arm64 root failed:\n" + r.stdout[-3000:])
    names = []
    for line in r.stdout.splitlines():
        m = re.match(r"^\s*(?:Saved|File was already downloaded)\s+(\S+\.whl)\s*$", line)
        if m:
            names.append(Path(m.group(1)).name)
    if not names:
        raise RigError("could not read the resolved wheels from pip's output:\n" + r.stdout[-3000:])
    lock.write_text("\n".join(sorted(set(names))) + "\n")
    log(f"{len(names)} wheels resolved in {time.monotonic() - t0:.0f}s")
    return [wheels / n for n in sorted(set(names))]


def _site_packages() -> Path:
    return ROOTFS / VENV.lstrip("/") / "lib" / f"python{PY}" / "site-packages"


def _host_pip_ok() -> bool:
    return _host_python_matches() and subprocess.run(
        [sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install_wheels(files: Sequence[Path]) -> None:
    """Install resolved wheels into the root's venv: the host's pip when it can (fast), else the root's."""
    sp = _site_packages()
    if _host_pip_ok():
        plat = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            _sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--only-binary=:all:",
                 "--target", tmp, *plat, "--python-version", PY, "--implementation", "cp",
                 "--abi", f"cp{PY.replace('.', '')}", *files], env=_clean_host_env())
            scripts = Path(tmp) / "bin"
            bindir = ROOTFS / VENV.lstrip("/") / "bin"
            if scripts.is_dir():
                for s in scripts.iterdir():
                    dst = bindir / s.name
                    if dst.exists() or dst.is_symlink():
                        dst.unlink()
                    data = s.read_bytes()
                    if data.startswith(b"#!") and b"python" in data.split(b"\n", 1)[0]:
                        data = f"#!{VENV}/bin/python".encode() + b"\n" + data.split(b"\n", 1)[1]
                    dst.write_bytes(data)
                    dst.chmod(0o755)
                shutil.rmtree(scripts)
            for item in Path(tmp).iterdir():
                dst = sp / item.name
                _rmtree(dst)
                shutil.move(str(item), dst)
    else:
        log("host Python is not CPython " + PY + " with pip: installing with the root's pip (slower)")
        inside = [f"/{f.relative_to('/')}" for f in files]
        r = _chroot([f"{VENV}/bin/python", _pip_wheel_in_root() + "/pip", "install", "-q", "--no-deps",
                     "--no-index", *inside], capture=True)
        if r.returncode != 0:
            raise RigError("pip install in the arm64 root failed:\n" + r.stdout[-3000:])


def ensure_venv(rebuilt_root: bool) -> bool:
    """The venv at VENV in the root, with the current requirement set; True when it was (re)made."""
    reqs = requirements()
    key = _digest(sorted(reqs), WHEEL_PLATFORMS)
    stamp_path = ROOTFS / VENV.lstrip("/") / ".rig-venv.json"
    if not rebuilt_root and _read_json(stamp_path).get("key") == key:
        return False
    t0 = time.monotonic()
    files = resolve_wheels(reqs)
    _rmtree(ROOTFS / VENV.lstrip("/"))
    r = _chroot(["/usr/bin/python3", "-m", "venv", "--without-pip", VENV], capture=True)
    if r.returncode != 0:
        raise RigError("python3 -m venv failed in the root:\n" + r.stdout[-2000:])
    t1 = time.monotonic()
    install_wheels(files)
    log(f"{len(files)} wheels installed in {time.monotonic() - t1:.0f}s")
    _write_json(stamp_path, {"key": key, "requirements": reqs, "wheels": [f.name for f in files],
                             "seconds": round(time.monotonic() - t0, 1)})
    return True


# --------------------------------------------------------------------------- running


_handler: dict | None = None


def _copy_host_files() -> dict[str, str]:
    """resolv.conf, hosts and the host's CA bundle (a CI proxy's CA included) into the root."""
    env = {}
    for name in ("resolv.conf", "hosts"):
        src = Path("/etc") / name
        if src.is_file():
            try:
                shutil.copyfile(src, ROOTFS / "etc" / name)
            except OSError:
                pass
    for cand in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                 os.environ.get("REQUESTS_CA_BUNDLE"), "/etc/ssl/certs/ca-certificates.crt"):
        if cand and Path(cand).is_file():
            dst = ROOTFS / "etc/ssl/certs/ca-certificates.crt"
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink():
                dst.unlink()
            shutil.copyfile(cand, dst)
            for k in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
                env[k] = "/etc/ssl/certs/ca-certificates.crt"
            break
    return env


def _chroot_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if PASS_ENV.match(k)}
    env.pop("COMPOSER_NUMA_ARM64_CACHE", None)
    env.update({
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "VIRTUAL_ENV": VENV,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        "COMPOSER_NUMA_ARM64_EMULATED": "1" if _emulated() else "0",
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
    })
    if _emulated():
        env.setdefault("QEMU_CPU", QEMU_CPU)
    env.update(_copy_host_files())
    env.update(extra or {})
    return env


def _binds() -> list[Path]:
    """Host directories visible in the root at their own paths: the checkout and the cache."""
    out = [REPO]
    if not CACHE.is_relative_to(REPO):
        out.append(CACHE)
    return out


def _chroot(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
            capture: bool = False, binds: Sequence[Path] = ()) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the root, in a private mount namespace with /proc, /sys, /dev, /tmp and the binds."""
    _place_interpreter(_handler)
    root = str(ROOTFS)
    mounts = [
        f"mount -t proc proc {shlex.quote(root + '/proc')}",
        f"mount --rbind /sys {shlex.quote(root + '/sys')}",
        f"mount --rbind /dev {shlex.quote(root + '/dev')}",
        f"mount -t tmpfs -o mode=1777 tmpfs {shlex.quote(root + '/tmp')}",
    ]
    for b in [*_binds(), *binds]:
        b = Path(b).resolve()
        target = shlex.quote(root + str(b))  # made after /tmp's tmpfs, so /tmp/... binds work
        mounts.append(f"mkdir -p {target} && mount --bind {shlex.quote(str(b))} {target}")
    wd = str(cwd or REPO)
    envargs = [f"{k}={v}" for k, v in _chroot_env(env).items()]
    script = " && ".join(mounts) + ' && exec chroot "$0" /usr/bin/env -i "$@"'
    inner = ["/bin/sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", wd, *cmd]
    full = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, root,
            *envargs, *inner]
    return subprocess.run(full, text=True, stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.STDOUT if capture else None)


def setup() -> dict:
    """Prepare everything (idempotent): host packages, binfmt, root, venv. Returns timings."""
    global _handler
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    t0 = time.monotonic()
    with _locked():
        if _emulated():
            ensure_host_packages(["qemu-aarch64-static"])
        _handler = ensure_binfmt()
        rebuilt = ensure_rootfs(_handler)
        _place_interpreter(_handler)
        remade = ensure_venv(rebuilt)
    return {"seconds": round(time.monotonic() - t0, 1), "rootfs_built": rebuilt, "venv_built": remade}


def run(cmd: Sequence[str], *, cwd: str | os.PathLike | None = None, env: dict[str, str] | None = None,
        capture: bool = False) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the arm64 root (after an idempotent setup); the checkout is at its own path."""
    setup()
    if cwd is None:
        here = Path.cwd().resolve()
        cwd = here if any(here.is_relative_to(b) for b in _binds()) else REPO
    return _chroot(cmd, cwd=cwd, env=env, capture=capture)


# --------------------------------------------------------------------------- building


def default_mode() -> str:
    return os.environ.get("COMPOSER_NUMA_ARM64_MODE", "cross")


def _project_name(project: Path) -> str:
    m = re.search(r'^name\s*=\s*"([^"]+)"', (project / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else project.name


def _locked_version(pkg: str) -> str | None:
    stamp = _read_json(ROOTFS / VENV.lstrip("/") / ".rig-venv.json")
    norm = pkg.replace("-", "_").lower()
    for w in stamp.get("wheels", []):
        name, version = w.split("-")[:2]
        if name.lower() == norm:
            return version
    return None


def ensure_host_build_venv() -> Path:
    """An x86-64 venv in the cache with scikit-build-core, nanobind (the root's versions), cmake, ninja."""
    if not _host_python_matches():
        raise Unavailable(f"cross builds need the host to run CPython {PY} (this is "
                          f"{platform.python_implementation()} {platform.python_version()}); use --mode native")
    reqs = []
    for pkg in ("scikit-build-core", "nanobind"):
        v = _locked_version(pkg)
        reqs.append(f"{pkg}=={v}" if v else pkg)
    reqs += ["cmake>=3.18", "ninja"]
    venv = CACHE / "host-venv"
    py = venv / "bin" / "python"
    key = _digest(reqs, sys.version)
    if _read_json(venv / ".rig.json").get("key") == key and py.exists():
        return py
    _rmtree(venv)
    _sh([sys.executable, "-m", "venv", venv])
    _sh([py, "-m", "pip", "install", "-q", *reqs], env=_clean_host_env())
    _write_json(venv / ".rig.json", {"key": key, "requirements": reqs})
    return py


def _install_wheel_in_root(wheel: Path) -> None:
    r = _chroot([f"{VENV}/bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                 "--force-reinstall", str(wheel)], capture=True)
    if r.returncode != 0:
        raise RigError(f"installing {wheel.name} in the root failed:\n{r.stdout[-3000:]}")


def build_cross(project: Path) -> Path:
    """Editable wheel of ``project`` cross-compiled on the host; installed in the root's venv."""
    ensure_host_packages(["aarch64-linux-gnu-g++"])
    py = ensure_host_build_venv()
    build_dir = CACHE / "build" / f"{_project_name(project)}-cross"
    out = CACHE / "build" / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{_project_name(project).replace('-', '_')}-*.whl"):
        old.unlink()
    settings = {
        "build-dir": str(build_dir),
        "cmake.define.CMAKE_TOOLCHAIN_FILE": str(TOOLCHAIN),
        "cmake.define.Python_INCLUDE_DIR": str(ROOTFS / "usr/include" / f"python{PY}"),
        "cmake.define.Python_SOABI": SOABI,
        "build.tool-args": ["-k0"],  # every failing file's errors in one run
    }
    env = _clean_host_env(
        _PYTHON_HOST_PLATFORM="linux-aarch64",
        SETUPTOOLS_EXT_SUFFIX=f".{SOABI}.so",
        COMPOSER_NUMA_ARM64_SYSROOT=str(ROOTFS),
        COMPOSER_NUMA_ARM64_PYTHON=PY,
        CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2),
        PATH=f"{py.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    code = ("import json, sys\nfrom scikit_build_core.build import build_editable\n"
            "print(build_editable(sys.argv[1], json.loads(sys.argv[2])))")
    r = _sh([py, "-c", code, out, json.dumps(settings)], env=env, cwd=project, check=False)
    if r.returncode != 0:
        raise RigError(f"cross build of {project} failed (exit {r.returncode}); the compiler's errors are above")
    wheels = sorted(out.glob(f"{_project_name(project).replace('-', '_')}-*.whl"))
    if not wheels:
        raise RigError(f"the cross build left no wheel in {out}")
    _install_wheel_in_root(wheels[-1])
    return wheels[-1]


def build_native(project: Path) -> None:
    """``pip install -e`` of ``project`` inside the root: compiled by the emulated g++."""
    build_dir = CACHE / "build" / f"{_project_name(project)}-native"
    r = _chroot([f"{VENV}/bin/python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                 "--no-index", "--config-settings", f"build-dir={build_dir}",
                 "--config-settings", "build.tool-args=-k0", "-e", str(project)],
                binds=[] if project.resolve().is_relative_to(REPO) else [project.resolve()])
    if r.returncode != 0:
        raise RigError(f"native (emulated) build of {project} failed (exit {r.returncode}); errors above")


def build(project: Path = REPO, mode: str | None = None) -> float:
    """Build ``project``'s extension for aarch64 and install it (editable) in the root; returns seconds."""
    mode = mode or default_mode()
    setup()
    t0 = time.monotonic()
    with _locked():
        if mode == "cross":
            build_cross(project)
        elif mode == "native":
            build_native(project)
        else:
            raise RigError(f"unknown build mode {mode!r} (cross or native)")
    secs = time.monotonic() - t0
    log(f"{mode} build of {_project_name(project)} for aarch64: {secs:.0f}s")
    return secs


# --------------------------------------------------------------------------- syntax check


def _nanobind_dir() -> Path:
    found = sorted(_site_packages().glob("nanobind/include"))
    if not found:
        raise RigError("nanobind is not installed in the root's venv")
    return found[0].parent


def syntax_check(files: Sequence[Path], extra_flags: Sequence[str] = ()) -> list[tuple[Path, bool, str]]:
    """``aarch64-linux-gnu-g++ -fsyntax-only`` over ``files`` with the root's Python and nanobind headers."""
    setup()
    ensure_host_packages(["aarch64-linux-gnu-g++"])
    nb = _nanobind_dir()
    flags = ["-std=c++17", f"--sysroot={ROOTFS}", "-isystem", str(ROOTFS / "usr/include" / f"python{PY}"),
             "-isystem", str(nb / "include"), "-isystem", str(nb / "ext/robin_map/include"),
             "-I", str(REPO / "ext"), "-fsyntax-only", "-O3", "-Wall", "-Wextra", *extra_flags]
    out = []
    for f in files:
        r = subprocess.run(["aarch64-linux-gnu-g++", *flags, str(f)], capture_output=True, text=True)
        first = next((ln for ln in r.stderr.splitlines() if " error: " in ln or ln.startswith("error:")
                      or " fatal error: " in ln), "")
        out.append((Path(f), r.returncode == 0, first))
    return out


# --------------------------------------------------------------------------- CLI


def _du(path: Path) -> int:
    r = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout else 0


def _skip_or_fail(reason: str) -> int:
    if required():
        print(f"arm64: FAILED (COMPOSER_NUMA_ARM64=1): {reason}", file=sys.stderr)
        return 1
    print(f"SKIP arm64 rig: {reason}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="harness.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="prepare the arm64 root and venv (idempotent)")
    pr = sub.add_parser("run", help="run a command in the arm64 root: run [--cwd DIR] -- CMD...")
    pr.add_argument("--cwd", help="working directory inside the root (default: here, or the checkout)")
    pr.add_argument("--env", action="append", default=[], metavar="K=V")
    pr.add_argument("command", nargs=argparse.REMAINDER)
    pb = sub.add_parser("build", help="build a project's extension for aarch64 into the root's venv")
    pb.add_argument("--mode", choices=("cross", "native"), default=None)
    pb.add_argument("--project", default=str(REPO), help="project directory (default: the checkout)")
    pt = sub.add_parser("test", help="build the extension for aarch64, then pytest in the root")
    pt.add_argument("--mode", choices=("cross", "native"), default=None)
    pt.add_argument("--no-build", action="store_true", help="use the extension already installed")
    pt.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest arguments (default: -m arm64)")
    ps = sub.add_parser("syntax", help="aarch64-linux-gnu-g++ -fsyntax-only over C++ files (default ext/**/*.cpp)")
    ps.add_argument("files", nargs="*")
    sub.add_parser("info", help="what is cached, and how big")
    args = p.parse_args(argv)

    def rest(xs: list[str]) -> list[str]:
        return xs[1:] if xs[:1] == ["--"] else xs

    try:
        if args.cmd == "setup":
            info = setup()
            print(f"arm64 rig ready in {info['seconds']}s (root rebuilt: {info['rootfs_built']}, "
                  f"venv rebuilt: {info['venv_built']}); cache {CACHE}")
            return 0
        if args.cmd == "run":
            cmd = rest(args.command)
            if not cmd:
                p.error("run needs a command after --")
            env = dict(kv.split("=", 1) for kv in args.env)
            return run(cmd, cwd=args.cwd, env=env).returncode
        if args.cmd == "build":
            build(Path(args.project).resolve(), args.mode)
            return 0
        if args.cmd == "test":
            if not args.no_build:
                build(REPO, args.mode)
            else:
                setup()
            pargs = rest(args.pytest_args)
            default = not pargs
            t0 = time.monotonic()
            r = _chroot([f"{VENV}/bin/python", "-m", "pytest", "-p", "no:cacheprovider",
                         "-p", "tests.arm64.emulation", *(pargs or ["-m", "arm64"])], cwd=REPO)
            log(f"pytest in the arm64 root: {time.monotonic() - t0:.0f}s, exit {r.returncode}")
            if r.returncode == 5 and default:
                print("arm64: no test carries the arm64 marker yet; nothing ran")
                return 0
            return r.returncode
        if args.cmd == "syntax":
            files = [Path(f) for f in args.files] or sorted((REPO / "ext").glob("**/*.cpp"))
            results = syntax_check(files)
            for f, ok, first in results:
                name = f.resolve().relative_to(REPO / "ext") if f.resolve().is_relative_to(REPO / "ext") else f
                print(f"{'ok  ' if ok else 'FAIL'} {name}" + ("" if ok else f"  {first}"))
            return 0 if all(ok for _, ok, _ in results) else 1
        if args.cmd == "info":
            print(f"cache: {CACHE}")
            for sub_ in ("debs", "wheels", "rootfs", "host-venv", "build", "apt"):
                path = CACHE / sub_
                if path.exists():
                    print(f"  {sub_:10s} {_du(path) / 2**20:8.0f} MiB")
            reason = unavailable_reason()
            print(f"status: {'unavailable: ' + reason if reason else 'available'}")
            for name in (".rig-rootfs.json", VENV.lstrip("/") + "/.rig-venv.json"):
                stamp = _read_json(ROOTFS / name)
                if stamp:
                    print(f"{name}: built in {stamp.get('seconds')}s")
            return 0
    except Unavailable as e:
        return _skip_or_fail(str(e))
    except RigError as e:
        print(f"arm64: error: {e}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
