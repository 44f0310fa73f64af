"""NumaExperts against KTransformers' CPU MoE kernels (kt-kernel 0.7.2), on the same weights and routings.

kt-kernel pins its own torch (2.9.1), which cannot live next to ours, so it
runs from a venv of its own: created once under ``benchmarks/.kt-venv`` (a few
GB: kt-kernel pulls the CUDA build of torch from PyPI) unless ``--kt-python``
names an interpreter that already has ``kt_kernel``. The two sides share
nothing but one ``.npz`` file that this script writes first: the layer's bf16
weights (as raw uint16 bits), random routings for every token count, and a
float64 reference output for the first routing of each count.

kt-kernel is driven through its low-level API, the one its own tests use (its
``KTMoEWrapper`` needs CUDA): a ``CPUInfer`` worker pool, a ``MOEConfig`` that
points at the dense bf16 weights, an MoE object (``AMXBF16_MOE`` /
``AVX2BF16_MOE`` for bf16, ``AMXInt8_MOE`` for int8, which quantizes the bf16
weights while loading), then ``submit(forward_task(...))`` + ``sync()`` per call.

NumaExperts runs in bf16 and as frozen int8 (a scale per row) and int4 (groups of 128) layers
quantized from the same weights; each kt row's ratio is against NumaExperts in its own format.

Every implementation runs in a fresh process per round, the implementations
alternate within a round (rotated each round), and the table shows medians
over all rounds. kt's dispatcher threads spin while they wait, so with few
cores kt is also shown with a single worker thread.

    python benchmarks/bench_moe_kt.py                        # default layer, 3 rounds
    python benchmarks/bench_moe_kt.py --rounds 1 --tokens 1,64 --repeats 3
    python benchmarks/bench_moe_kt.py --kt-python /opt/kt/bin/python
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".kt-venv"
KT_SPEC = "kt-kernel==0.7.2"
READY_STAMP = ".bench-moe-kt-ready"


# ----------------------------------------------------------------- helpers --


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def proc_status_bytes(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes (no psutil in the kt venv)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def bf16_bits_to_f32(a):
    import numpy as np

    return (a.astype(np.uint32) << 16).view(np.float32)


def usable_nodes() -> list[int]:
    """NUMA nodes that hold CPUs this process may run on (kt gets one subpool per node, as NumaExperts a slice)."""
    usable = os.sched_getaffinity(0)
    nodes = []
    for d in sorted(Path("/sys/devices/system/node").glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        try:
            text = (d / "cpulist").read_text().strip()
        except OSError:
            continue
        cpus: set[int] = set()
        for part in filter(None, text.split(",")):
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
        if cpus & usable:
            nodes.append(int(d.name[4:]))
    return nodes or [0]


def busy_cpu_seconds() -> float:
    """CPU time the whole machine spent busy (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")  # user nice system irq softirq steal


def own_cpu_seconds() -> float:
    """CPU time of this process and its finished children (the workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
                             check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    if "Model name" not in fields:
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key.strip() == "model name":
                        fields["Model name"] = value.strip()
                    elif key.strip() == "vendor_id":
                        fields["Vendor ID"] = value.strip()
        except OSError:
            pass
    isa = []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        isa = [x for x in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if x in flags]
    except OSError:
        pass
    return (f"{fields.get('Model name', 'unknown')} (vendor {fields.get('Vendor ID', 'unknown')}), "
            f"{len(os.sched_getaffinity(0))} CPUs usable, ISA: {' '.join(isa) or 'unknown'}")


# --------------------------------------------------------- kt environment --


def ensure_kt_python(args) -> tuple[str | None, str]:
    """The interpreter that runs kt-kernel, creating the cached venv if needed; (None, why) on failure."""
    if args.kt_python:
        return args.kt_python, f"--kt-python {args.kt_python}"
    venv = Path(args.kt_venv)
    py = venv / "bin" / "python"
    if (venv / READY_STAMP).exists() and py.exists():
        return str(py), f"cached venv {venv}"
    log(f"[bench_moe_kt] creating {venv} with {KT_SPEC} and its pinned torch (once; a few GB of wheels)...")
    t0 = time.perf_counter()
    try:
        if venv.exists():
            shutil.rmtree(venv)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        logfile = venv / "pip-install.log"
        with open(logfile, "w") as out:
            r = subprocess.run([str(py), "-m", "pip", "install", "--disable-pip-version-check", KT_SPEC],
                               stdout=out, stderr=subprocess.STDOUT, check=False)
        if r.returncode != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
            return None, f"pip install {KT_SPEC} failed (see {logfile}): {' | '.join(tail)}"
    except (OSError, subprocess.CalledProcessError) as e:
        return None, f"could not create {venv}: {e}"
    (venv / READY_STAMP).write_text(KT_SPEC + "\n")
    took = time.perf_counter() - t0
    log(f"[bench_moe_kt] venv ready in {took:.0f} s")
    return str(py), f"new venv {venv} (created in {took:.0f} s)"


# ------------------------------------------------------------ shared data --


def make_data(path: Path, args, tokens: list[int]) -> dict:
    """Write weights, routings and the float64 references to ``path`` (run in our Python)."""
    import numpy as np
    import torch

    E, H, inter, K = args.experts, args.hidden, args.intermediate, args.top_k
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    def bits(t: torch.Tensor) -> np.ndarray:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)

    gate = np.empty((E, inter, H), np.uint16)
    up = np.empty((E, inter, H), np.uint16)
    down = np.empty((E, H, inter), np.uint16)
    for e in range(E):  # expert by expert to bound the peak
        gate[e] = bits(torch.randn(inter, H, generator=gen) * H**-0.5)
        up[e] = bits(torch.randn(inter, H, generator=gen) * H**-0.5)
        down[e] = bits(torch.randn(H, inter, generator=gen) * inter**-0.5)
    arrays: dict[str, np.ndarray] = {"gate": gate, "up": up, "down": down}
    for T in tokens:
        for i in range(args.repeats + 1):  # set 0: warm-up and accuracy; 1..repeats: timed
            probs = torch.softmax(torch.randn(T, E, generator=gen), dim=-1)
            w, ids = torch.topk(probs, K, dim=-1)
            w = w / w.sum(dim=-1, keepdim=True)
            arrays[f"x_{T}_{i}"] = bits(torch.randn(T, H, generator=gen))
            arrays[f"ids_{T}_{i}"] = ids.to(torch.int64).numpy()
            arrays[f"w_{T}_{i}"] = w.to(torch.float32).numpy()
        arrays[f"ref_{T}"] = reference(arrays[f"x_{T}_0"], arrays[f"ids_{T}_0"], arrays[f"w_{T}_0"], gate, up, down)
    meta = {"experts": E, "hidden": H, "intermediate": inter, "top_k": K, "tokens": tokens,
            "repeats": args.repeats, "weight_bytes": int(gate.nbytes + up.nbytes + down.nbytes)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    log(f"[bench_moe_kt] wrote {path} ({path.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.0f} s")
    return meta


def reference(x_bits, ids, w, gate, up, down):
    """sum_k w_k * down_e(silu(gate_e x) * up_e x) in float64 from the bf16 values; returned as float32."""
    import numpy as np

    x = bf16_bits_to_f32(x_bits).astype(np.float64)
    out = np.zeros_like(x)
    for e in np.unique(ids):
        tok, slot = np.nonzero(ids == e)  # a token picks an expert at most once
        xe = x[tok]
        g = xe @ bf16_bits_to_f32(gate[e]).astype(np.float64).T
        u = xe @ bf16_bits_to_f32(up[e]).astype(np.float64).T
        h = g / (1.0 + np.exp(-g)) * u
        out[tok] += w[tok, slot, None].astype(np.float64) * (h @ bf16_bits_to_f32(down[e]).astype(np.float64).T)
    return out.astype(np.float32)


# ---------------------------------------------------------------- workers --


class _Data:
    def __init__(self, path: str) -> None:
        import numpy as np

        self.npz = np.load(path)
        self.meta = json.loads(bytes(self.npz["meta"]).decode())

    def case(self, T: int, i: int):
        return self.npz[f"x_{T}_{i}"], self.npz[f"ids_{T}_{i}"], self.npz[f"w_{T}_{i}"]


def _rel_err(out_f32, ref) -> float:
    import numpy as np

    return float(np.linalg.norm(out_f32.astype(np.float64) - ref) / np.linalg.norm(ref.astype(np.float64)))


def _measure(run, data: _Data, pause: float) -> dict:
    """Per T: accuracy on set 0 (also the warm-up), then the timed sets."""
    res = {}
    for T in data.meta["tokens"]:
        out = run(*data.case(T, 0))
        err = _rel_err(out, data.npz[f"ref_{T}"])
        times = []
        for i in range(1, data.meta["repeats"] + 1):
            case = data.case(T, i)
            time.sleep(pause)  # idle first, as between the MoE layers of a decode step
            t0 = time.perf_counter()
            run(*case)
            times.append(time.perf_counter() - t0)
        res[str(T)] = {"times": times, "err": err}
    return res


def worker_numa(args, fmt: str) -> dict:
    """NumaExperts on the shared data (our Python, our torch): bf16, or frozen int8 (a scale per row) /
    int4 (groups of 128) quantized from the same bf16 weights, as ``bench_moe.py`` does."""
    import torch

    from composer_numa import NumaExperts

    data = _Data(args.data)
    gate, up, down = (torch.from_numpy(data.npz[n].view("int16")).view(torch.bfloat16) for n in ("gate", "up", "down"))
    gc.collect()
    rss0 = proc_status_bytes("VmRSS")
    peak_ok = reset_peak_rss()
    t0 = time.perf_counter()
    quant = {} if fmt == "bf16" else {"weight_dtype": fmt, "group_size": 128 if fmt == "int4" else None}
    layer = NumaExperts.from_dense(gate, up, down, **quant)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss1 = proc_status_bytes("VmRSS")
    peak = proc_status_bytes("VmHWM") if peak_ok else 0
    del gate, up, down
    gc.collect()
    workers = None
    try:  # not public API: only for the label
        from composer_numa.offload import runtime

        workers = runtime.pool().size
    except Exception:
        pass
    kernel = layer.report(measure_bandwidth=False).kernel

    def run(x_bits, ids, w):
        x = torch.from_numpy(x_bits.view("int16")).view(torch.bfloat16)
        with torch.inference_mode():
            y = layer(x, torch.from_numpy(ids), torch.from_numpy(w))
        return y.float().numpy()

    res = _measure(run, data, args.pause_ms / 1e3)
    label = f"NumaExperts {fmt} {kernel}" + (f", {workers} workers" if workers else "")
    return {"label": label, "results": res, "rss_growth": rss1 - rss0,
            "rss_peak_growth": (peak - rss0) if peak_ok else None, "build_s": build_s}


def kt_probe() -> dict:
    """What the kt-kernel in this interpreter offers (run in the kt venv)."""
    import kt_kernel

    ext = kt_kernel.kt_kernel_ext
    moe = ext.moe
    classes = sorted(n for n in dir(moe) if n.endswith("_MOE"))
    int8_kernel = str(getattr(kt_kernel, "__int8_kernel__", "unknown"))
    bf16 = "AMXBF16_MOE" if hasattr(moe, "AMXBF16_MOE") else ("AVX2BF16_MOE" if hasattr(moe, "AVX2BF16_MOE") else None)
    int8 = "AMXInt8_MOE" if hasattr(moe, "AMXInt8_MOE") and int8_kernel != "unsupported" else None
    return {"version": getattr(kt_kernel, "__version__", "?"), "variant": str(kt_kernel.__cpu_variant__),
            "int8_kernel": int8_kernel, "int8_layout": str(getattr(kt_kernel, "__int8_weight_layout__", "?")),
            "bf16_class": bf16, "int8_class": int8, "classes": classes}


layer_keepalive: list = []


def _kt_layer(ext, cls_name: str, threads: int, gate, up, down, meta: dict, max_len: int,
              nodes: list[int] | None = None):
    """A CPUInfer pool (one subpool of ``threads`` per NUMA node) and one loaded MoE layer."""
    import numpy as np

    nodes = nodes or [0]
    cfg = ext.WorkerPoolConfig()
    cfg.subpool_count = len(nodes)  # kt splits the intermediate dimension over the subpools
    cfg.subpool_numa_map = list(nodes)
    cfg.subpool_thread_count = [threads] * len(nodes)
    cpu_infer = ext.CPUInfer(cfg)
    E = meta["experts"]
    # The int overload of the last argument (number of GPU experts): 0, every expert on the CPU.
    conf = ext.moe.MOEConfig(E, meta["top_k"], meta["hidden"], meta["intermediate"], 0)
    conf.layer_idx = 0
    conf.max_len = -(-max_len // 64) * 64  # kt's AMX buffers take whole 64-row steps (its int8 kernel refuses others)
    conf.pool = cpu_infer.backend_
    conf.gate_proj = gate.ctypes.data  # dense bf16 [E, I, H], [E, I, H], [E, H, I]
    conf.up_proj = up.ctypes.data
    conf.down_proj = down.ctypes.data
    conf.save = False  # quantizing kinds: quantize in memory, write no .kt files
    conf.load = False
    layer = getattr(ext.moe, cls_name)(conf)
    identity = np.arange(E, dtype=np.int64)  # physical -> logical expert ids
    cpu_infer.submit(layer.load_weights_task(identity.ctypes.data))
    cpu_infer.sync()
    layer_keepalive.extend([identity, conf])  # kt keeps raw pointers into these
    return cpu_infer, layer


def worker_kt(args, kind: str) -> dict:
    """kt-kernel's bf16 or int8 MoE on the shared data (run in the kt venv)."""
    import numpy as np

    probe = kt_probe()
    import kt_kernel

    ext = kt_kernel.kt_kernel_ext
    cls_name = probe["bf16_class"] if kind == "bf16" else probe["int8_class"]
    if cls_name is None:
        raise RuntimeError(f"this kt-kernel build ({probe['variant']}) has no {kind} MoE")
    data = _Data(args.data)
    meta = data.meta
    gate, up, down = (np.ascontiguousarray(data.npz[n]) for n in ("gate", "up", "down"))
    gc.collect()
    rss0 = proc_status_bytes("VmRSS")
    peak_ok = reset_peak_rss()
    t0 = time.perf_counter()
    nodes = usable_nodes()
    cpu_infer, layer = _kt_layer(ext, cls_name, args.threads, gate, up, down, meta, max(meta["tokens"]), nodes)
    build_s = time.perf_counter() - t0
    gc.collect()
    rss1 = proc_status_bytes("VmRSS")
    peak = proc_status_bytes("VmHWM") if peak_ok else 0
    del gate, up, down  # kt keeps its own (packed / quantized) copy
    gc.collect()
    H, K = meta["hidden"], meta["top_k"]
    qlen = np.zeros(1, np.int32)
    out = np.empty((max(meta["tokens"]), H), np.uint16)

    def run(x_bits, ids, w):
        T = x_bits.shape[0]
        qlen[0] = T
        x_bits, ids, w = (np.ascontiguousarray(a) for a in (x_bits, ids, w))
        cpu_infer.submit(layer.forward_task(qlen.ctypes.data, K, ids.ctypes.data, w.ctypes.data,
                                            x_bits.ctypes.data, out.ctypes.data, False))
        cpu_infer.sync()
        return bf16_bits_to_f32(out[:T])

    res = _measure(run, data, args.pause_ms / 1e3)
    label = f"kt {kind} {cls_name} [{probe['variant']}], {args.threads} thread{'s' if args.threads > 1 else ''}"
    if len(nodes) > 1:
        label += f" x {len(nodes)} nodes"
    return {"label": label, "results": res, "rss_growth": rss1 - rss0,
            "rss_peak_growth": (peak - rss0) if peak_ok else None, "build_s": build_s, "probe": probe}


def worker_kt_smoke(args, kind: str) -> dict:
    """A few tokens through a small layer of the real width (crashes here, not mid-benchmark, on a missing ISA)."""
    import numpy as np

    probe = kt_probe()
    import kt_kernel

    cls_name = probe["bf16_class"] if kind == "bf16" else probe["int8_class"]
    meta = {"experts": 8, "top_k": 2, "hidden": args.hidden, "intermediate": args.intermediate}
    E, H, inter, K, T = 8, args.hidden, args.intermediate, 2, 3
    rng = np.random.default_rng(0)

    def bits(a):
        return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine here

    gate, up = (bits(rng.standard_normal((E, inter, H)) * H**-0.5) for _ in range(2))
    down = bits(rng.standard_normal((E, H, inter)) * inter**-0.5)
    x = bits(rng.standard_normal((T, H)))
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int64)
    w = np.full((T, K), 1.0 / K, np.float32)
    cpu_infer, layer = _kt_layer(kt_kernel.kt_kernel_ext, cls_name, 1, gate, up, down, meta, T, usable_nodes())
    qlen, out = np.array([T], np.int32), np.empty((T, H), np.uint16)
    cpu_infer.submit(layer.forward_task(qlen.ctypes.data, K, ids.ctypes.data, w.ctypes.data, x.ctypes.data,
                                        out.ctypes.data, False))
    cpu_infer.sync()
    return {"err": _rel_err(bf16_bits_to_f32(out), reference(x, ids, w, gate, up, down))}


def worker_main(args) -> int:
    if args.worker == "probe":
        result = kt_probe()
    elif args.worker.startswith("smoke-"):
        result = worker_kt_smoke(args, args.worker.removeprefix("smoke-"))
    elif args.worker.startswith("numa"):
        result = worker_numa(args, args.worker.removeprefix("numa").removeprefix("-") or "bf16")
    else:
        result = worker_kt(args, args.worker.removeprefix("kt-"))
    Path(args.out).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip teardown of the worker pools (kt's spin threads) once the result is written


# ----------------------------------------------------------- orchestrator --


def run_worker(python: str, kind: str, args, data: Path | None, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--out", out, "--threads", str(threads),
           "--pause-ms", str(args.pause_ms), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    if data is not None:
        cmd += ["--data", str(data)]
    env = dict(os.environ)
    if not kind.startswith("numa"):
        env.pop("PYTHONPATH", None)  # nothing of ours (or our torch) in the kt venv
        if args.kt_variant:
            env["KT_KERNEL_CPU_VARIANT"] = args.kt_variant
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.worker_timeout, check=False)
        text = Path(out).read_text() if Path(out).stat().st_size else ""
        if r.returncode != 0 or not text:
            if r.returncode == -signal.SIGILL:
                return {"error": "killed by SIGILL (illegal instruction): the kernel uses an ISA extension "
                                 "this CPU lacks", "log": r.stdout + r.stderr}
            how = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
            lines = [ln for ln in (r.stderr + r.stdout).strip().splitlines() if ln.strip()]
            return {"error": f"{how}: {lines[-1] if lines else 'no output'}", "log": r.stdout + r.stderr}
        return json.loads(text)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.worker_timeout} s"}
    except OSError as e:
        return {"error": f"could not start {python}: {e}"}
    finally:
        Path(out).unlink(missing_ok=True)


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", default="1,8,64,512", help="comma-separated token counts")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per token count, process and round")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation (alternating)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pause-ms", type=float, default=20.0, help="idle time before each timed call")
    ap.add_argument("--kt-python", help="an interpreter with kt-kernel installed (default: the cached venv)")
    ap.add_argument("--kt-venv", default=str(DEFAULT_VENV), help="where to create / find the cached kt venv")
    ap.add_argument("--kt-threads", default="auto",
                    help="comma-separated kt worker-thread counts per NUMA node (default: the usable CPUs of a "
                         "node, and 1)")
    ap.add_argument("--no-kt", action="store_true", help="NumaExperts only")
    ap.add_argument("--worker-timeout", type=float, default=1800.0)
    ap.add_argument("--keep-data", help="write the shared .npz here and keep it (default: a temporary file)")
    ap.add_argument("--kt-variant", help="force kt's CPU variant (KT_KERNEL_CPU_VARIANT: amx, avx512_bf16, avx2, ...)")
    # internal: one measurement in a fresh process
    ap.add_argument("--worker", choices=["numa", "numa-int8", "numa-int4", "kt-bf16", "kt-int8", "probe",
                                         "smoke-bf16", "smoke-int8"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)

    t_start, busy0, own0 = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    tokens = [int(t) for t in args.tokens.split(",")]
    ncpu = len(os.sched_getaffinity(0))
    per_node = max(1, ncpu // len(usable_nodes()))
    if args.kt_threads == "auto":
        kt_threads = [per_node] + ([1] if per_node > 1 else [])
    else:
        kt_threads = [int(t) for t in args.kt_threads.split(",")]
    print(f"CPU: {cpu_model()}")
    print(f"layer: {args.experts} experts, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"top-{args.top_k}, bf16 weights; T = {', '.join(map(str, tokens))}; "
          f"{args.rounds} rounds x {args.repeats} timed calls per T (fresh routing each), {args.pause_ms:g} ms idle "
          "before each")

    # kt-kernel: its interpreter, what it offers here, and a smoke test on this CPU.
    kt_note, probe, kt_python = None, None, None
    if args.no_kt:
        kt_note = "kt-kernel: skipped (--no-kt)"
    else:
        kt_python, how = ensure_kt_python(args)
        if kt_python is None:
            kt_note = f"kt-kernel: NOT RUN - {how}"
        else:
            probe = run_worker(kt_python, "probe", args, None, 1)
            if "error" in probe:
                kt_note = f"kt-kernel CANNOT RUN here: importing it with {kt_python} failed: {probe['error']}"
                probe = None
            else:
                print(f"kt-kernel {probe['version']} from {how}: CPU variant {probe['variant']} "
                      f"(int8 kernel: {probe['int8_kernel']}, int8 layout {probe['int8_layout']}); "
                      f"bf16 MoE: {probe['bf16_class'] or 'none'}, int8 MoE: {probe['int8_class'] or 'none'}")
                if probe["int8_class"] is None:
                    has = "AMXInt8_MOE" in probe["classes"]
                    print(f"kt-kernel: no int8 MoE on this CPU: the {probe['variant']} build "
                          f"{'reports its int8 kernel unsupported' if has else 'has no AMXInt8_MOE'} "
                          "(kt's int8 needs AVX-512 VNNI + BF16 or AMX)")
                broken = {}
                for kind in ("bf16", "int8"):
                    if probe[f"{kind}_class"]:
                        smoke = run_worker(kt_python, f"smoke-{kind}", args, None, 1)
                        if "error" in smoke:
                            broken[kind] = smoke["error"]
                            probe[f"{kind}_class"] = None
                        else:
                            print(f"kt-kernel {kind} smoke test (8 experts, 3 tokens): relative error "
                                  f"{smoke['err']:.2e}")
                if broken:
                    by_error: dict[str, list[str]] = {}
                    for k, v in broken.items():
                        by_error.setdefault(v, []).append(k)
                    what = "; ".join(f"{' and '.join(ks)}: {v}" for v, ks in by_error.items())
                    scope = "its " + " and ".join(broken) + " MoE"
                    if not (probe["bf16_class"] or probe["int8_class"]):
                        scope = "at all"
                    kt_note = f"kt-kernel CANNOT RUN {scope} on this CPU (variant {probe['variant']}): {what}"

    variants: list[tuple[str, str, int]] = [(k, k, 0) for k in ("numa", "numa-int8", "numa-int4")]
    if probe is not None:
        for kind in ("bf16", "int8"):
            if probe[f"{kind}_class"]:
                variants += [(f"kt-{kind}-{n}t", f"kt-{kind}", n) for n in kt_threads]

    tmpdir = None
    if args.keep_data:
        data = Path(args.keep_data)
    else:
        tmpdir = tempfile.mkdtemp(prefix="bench_moe_kt_")
        data = Path(tmpdir) / "moe.npz"
    try:
        meta = make_data(data, args, tokens)
        gc.collect()
        results: dict[str, list[dict]] = {key: [] for key, _, _ in variants}
        for rnd in range(args.rounds):
            order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for key, kind, threads in order:
                if any("error" in r for r in results[key]):
                    continue  # failed before: do not retry every round
                python = sys.executable if kind.startswith("numa") else kt_python
                t0 = time.perf_counter()
                r = run_worker(python, kind, args, data, threads)
                log(f"[bench_moe_kt] round {rnd + 1}/{args.rounds}: {key} "
                    f"{'FAILED: ' + r['error'] if 'error' in r else 'done'} in {time.perf_counter() - t0:.0f} s")
                results[key].append(r)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)

    print_table(variants, results, meta, tokens, kt_note)
    wall = time.perf_counter() - t_start
    others = max(0.0, (busy_cpu_seconds() - busy0) - (own_cpu_seconds() - own0))
    print(f"other processes used {others:.0f} CPU-s during the run ({others / (wall * ncpu) * 100:.0f}% of the "
          f"{ncpu} CPUs; above a few % the timings are contended); total wall time {wall:.0f} s")
    return 0


def print_table(variants, results, meta, tokens, kt_note) -> None:
    wb = meta["weight_bytes"]
    labels, failed = {}, []
    for key, _, _ in variants:
        ok = [r for r in results[key] if "error" not in r]
        if ok:
            labels[key] = ok[0]["label"]
        else:
            err = next((r["error"] for r in results[key] if "error" in r), "no result")
            failed.append(f"{key}: {err}")
    print()
    print(f"weights: {wb / 2**20:,.0f} MiB bf16 (gate + up + down); ratio = kt ms / NumaExperts ms in the same "
          "format (kt bf16 against NumaExperts bf16, kt int8 against NumaExperts int8; > 1: NumaExperts faster); "
          "err = relative Frobenius error vs the float64 reference; "
          "RSS = resident growth while building the layer (peak in brackets) / weight bytes")
    width = max([len(v) for v in labels.values()] + [20])
    header = f"{'T':>4}  {'implementation':<{width}} {'median ms':>10} {'min ms':>8} {'ratio':>7} {'err':>9} " \
             f"{'RSS':>15}"
    print(header)
    print("-" * len(header))
    same_format = {"bf16": "numa", "int8": "numa-int8"}  # kt's kinds -> our row in the same format
    for T in tokens:
        ours = {}
        for key in same_format.values():
            ok = [r for r in results.get(key, []) if "error" not in r]
            ours[key] = statistics.median(t for r in ok for t in r["results"][str(T)]["times"]) if ok else None
        for key, kind, _ in variants:
            ok = [r for r in results[key] if "error" not in r]
            if not ok:
                continue
            times = [t for r in ok for t in r["results"][str(T)]["times"]]
            med = statistics.median(times)
            err = max(r["results"][str(T)]["err"] for r in ok)
            ref = ours.get(same_format.get(kind.removeprefix("kt-"), ""))
            ratio = "-" if kind.startswith("numa") or ref is None else f"{med / ref:.2f}x"
            rss = statistics.median(r["rss_growth"] for r in ok) / wb
            peaks = [r["rss_peak_growth"] for r in ok if r.get("rss_peak_growth") is not None]
            rss_text = f"{rss:.2f}x" + (f" ({statistics.median(peaks) / wb:.2f}x)" if peaks else "")
            print(f"{T:>4}  {labels[key]:<{width}} {fmt_ms(med):>10} {fmt_ms(min(times)):>8} {ratio:>7} "
                  f"{err:>9.2e} {rss_text:>15}")
    for line in failed:
        print(f"FAILED {line}")
    if kt_note:
        print(kt_note)


if __name__ == "__main__":
    sys.exit(main())
