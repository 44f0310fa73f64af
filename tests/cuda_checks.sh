#!/usr/bin/env bash
# The GPU checks in one command, for whoever has a CUDA machine: print the GPU order as NVML,
# CUDA/torch and composer-numa see it, then run every test marked `cuda` (NumaAdamW's offload
# pipeline with pinned node-local buffers, NumaExperts with inputs on the GPU, a GPT-2-sized
# Composer run with the parameters on the GPU). Extra arguments go to pytest (e.g. -x, -k gpt2).
#
#   tests/cuda_checks.sh            # from the repository root, after `pip install -e ".[test]"`
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

echo "== GPUs (nvidia-smi, PCI order) =="
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total --format=csv,noheader
    nvidia-smi topo -m 2>/dev/null | head -n 20
else
    echo "nvidia-smi not found"
fi

echo "== NVML, torch.cuda and composer-numa =="
"$PY" - <<'PY'
import os

print("CUDA_VISIBLE_DEVICES =", os.environ.get("CUDA_VISIBLE_DEVICES"), " CUDA_DEVICE_ORDER =",
      os.environ.get("CUDA_DEVICE_ORDER"))
try:
    import pynvml

    pynvml.nvmlInit()
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(h)
        print(f"nvml  {i}: {name.decode() if isinstance(name, bytes) else name}  "
              f"bus {pynvml.nvmlDeviceGetPciInfo(h).busId}")
except Exception as e:  # noqa: BLE001
    print("nvml: unavailable:", e)
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, "available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    bus = f"{getattr(p, 'pci_domain_id', 0):04x}:{getattr(p, 'pci_bus_id', 0):02x}:{getattr(p, 'pci_device_id', 0):02x}"
    print(f"torch {i}: {p.name}  bus {bus}  {p.total_memory / 2**30:.0f} GiB")
from composer_numa.machine.sysfs import discover

for i, g in enumerate(discover().gpus):
    print(f"composer-numa cuda:{i}: {g}")
PY

echo "== pytest -m cuda =="
exec "$PY" -m pytest -p no:cacheprovider -m cuda -rA -W ignore tests "$@"
