"""This machine's matmul peak at the training thread count: the best of a few large `torch.mm` calls in
fp32 and bf16 (GFLOP/s), the denominator of the training runs' model FLOPs utilisation (bench/README.md).

    python -m bench.peak [--n 3072] [--reps 5]     # prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import time


def peak(n: int, reps: int) -> dict:
    import torch

    out = {"n": n, "threads": torch.get_num_threads()}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        c = a @ b  # warm-up: oneDNN/MKL pick and cache their kernels
        best = best_cpu = float("inf")
        for _ in range(reps):
            t, tc = time.perf_counter(), time.process_time()
            torch.mm(a, b, out=c)
            best, best_cpu = min(best, time.perf_counter() - t), min(best_cpu, time.process_time() - tc)
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
        # per CPU-second (all threads): the rate while scheduled; a loaded machine's wall clock also counts the
        # time other processes hold the cores
        out[f"{name}_gflops_cpu"] = round(2 * n**3 / best_cpu / 1e9, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peak", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3072)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    print("PEAK " + json.dumps(peak(a.n, a.reps)))


if __name__ == "__main__":
    main()
