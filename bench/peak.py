"""The machine's matmul peak on the training device: the best of a few large `torch.mm` calls (GFLOP/s), the
denominator of the training runs' model FLOPs utilisation (bench/README.md). CPU: fp32 and bf16 at the training
thread count (also per CPU-second). CUDA: fp32 (matmul precision "highest"), tf32 ("high": TF32 tensor cores)
and bf16, each timed between torch.cuda.synchronize() calls.

    python -m bench.peak [--device auto|cpu|cuda] [--n N] [--reps 5]   # prints one line: PEAK {json}
    python -m bench.peak --info [--device ...]                          # the device only: DEVICE {json}
"""

from __future__ import annotations

import argparse
import json
import time

DEFAULT_N = {"cpu": 3072, "cuda": 8192}  # a GPU needs a larger product to reach its peak


def device_info(choice: str) -> dict:
    """The device a --device choice means here: {"type": cpu|cuda, "name": ...}; auto = cuda when
    torch.cuda.is_available(). Asking for cuda without one raises SystemExit."""
    import platform

    import torch

    if choice not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"--device {choice!r}: choose auto, cpu or cuda")
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda, "capability": ".".join(map(str, torch.cuda.get_device_capability(0)))}
    from bench.common import machine_info

    return {"type": "cpu", "name": machine_info().get("cpu") or platform.machine()}


def _best_time(mm, sync, reps: int) -> tuple[float, float]:
    """Best wall and best process-CPU seconds of `reps` calls of mm(), each finished (sync) before the clock."""
    best = best_cpu = float("inf")
    for _ in range(reps):
        sync()
        t, tc = time.perf_counter(), time.process_time()
        mm()
        sync()
        best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - tc)
    return best, best_cpu


def peak(n: int, reps: int, device: str = "cpu") -> dict:
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    out = {"n": n, "device": dev.type, "threads": torch.get_num_threads()}
    if cuda:
        out["device_name"] = torch.cuda.get_device_name(dev)
    # (name, dtype, float32 matmul precision): tf32 is fp32 tensors with TF32 matmuls, a GPU mode only
    kinds = [("fp32", torch.float32, "highest"), ("bf16", torch.bfloat16, "highest")]
    if cuda:
        kinds.insert(1, ("tf32", torch.float32, "high"))
    before = torch.get_float32_matmul_precision()
    try:
        for name, dtype, precision in kinds:
            torch.set_float32_matmul_precision(precision)
            g = torch.Generator().manual_seed(0)
            a = torch.randn(n, n, generator=g).to(dev, dtype)
            b = torch.randn(n, n, generator=g).to(dev, dtype)
            c = a @ b  # warm-up: oneDNN/MKL/cuBLAS pick and cache their kernels (and a GPU raises its clocks)
            for _ in range(3 if cuda else 0):
                torch.mm(a, b, out=c)
            best, best_cpu = _best_time(lambda a=a, b=b, c=c: torch.mm(a, b, out=c), sync, reps)
            out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
            if not cuda:
                # per CPU-second (all threads): the rate while scheduled; a loaded machine's wall clock also
                # counts the time other processes hold the cores (on a GPU the CPU only waits)
                out[f"{name}_gflops_cpu"] = round(2 * n**3 / best_cpu / 1e9, 1)
            del a, b, c
    finally:
        torch.set_float32_matmul_precision(before)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--n", type=int, help="matrix size (default 3072 on CPU, 8192 on CUDA)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--info", action="store_true", help="print the device only")
    a = p.parse_args(argv)
    info = device_info(a.device)
    if a.info:
        print("DEVICE " + json.dumps(info))
        return
    print("PEAK " + json.dumps(peak(a.n or DEFAULT_N[info["type"]], a.reps, info["type"])))


if __name__ == "__main__":
    main()
