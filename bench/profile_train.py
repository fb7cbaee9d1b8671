"""Where a peftcli training step spends its time: torch.profiler over a few steps of a bench workload,
operators sorted by self CPU time, and the share of matrix products (aten::mm/addmm/bmm and the attention
kernels) against everything else (elementwise passes, copies, casts, allocation, the optimizer).

    python -m bench.profile_train --workload c4-text                       # fp32
    python -m bench.profile_train --workload alpaca --set train.mixed_precision=bf16
    py-spy record -o step.svg -- python -m bench.profile_train --workload c4-text --no-torch-profiler

Same recipe and --set items as the train section (bench/run.py); the threads follow OMP_NUM_THREADS.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from bench.run import TRAIN_RECIPE, WORKLOADS, workload_sets

MATMUL = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="c4-text", choices=list(WORKLOADS))
    p.add_argument("--set", action="append", default=[], help="extra recipe overrides, e.g. train.mixed_precision=bf16")
    p.add_argument("--warmup", type=int, default=2, help="steps before the profiled ones (default 2)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps (default 2)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-torch-profiler", action="store_true", help="time the steps only (for py-spy)")
    a = p.parse_args(argv)

    import torch

    from peftcli.recipe import load_recipe
    from peftcli.train import Trainer

    ctx = SimpleNamespace(a=SimpleNamespace(steps=a.warmup + a.steps, batch=4, seq=256, gsm8k_rows=1000),
                          work=Path(tempfile.mkdtemp(prefix="peftcli-profile-")))
    recipe = load_recipe(TRAIN_RECIPE, workload_sets(ctx, a.workload) + a.set)
    t = Trainer(recipe, output_dir=str(ctx.work / "run"), overwrite=True)
    t.setup()
    for s in range(a.warmup):
        t.train_step(s)
    t0 = time.perf_counter()
    if a.no_torch_profiler:
        for s in range(a.warmup, a.warmup + a.steps):
            t.train_step(s)
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for s in range(a.warmup, a.warmup + a.steps):
                t.train_step(s)
        ev = prof.key_averages()
        print(ev.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
        total = sum(e.self_cpu_time_total for e in ev)
        mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL)
        print(f"matrix products: {100 * mm / total:.1f}% of self CPU time; everything else {100 * (total - mm) / total:.1f}%")
    dt = (time.perf_counter() - t0) / a.steps
    print(f"{a.workload} {' '.join(a.set)}: {dt:.2f} s/step over {a.steps} steps (threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
