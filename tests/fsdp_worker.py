"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: LoRA on a tiny Llama sharded with
FSDP2 (torch's fully_shard, per decoder layer + root, over gloo), two training steps, then peftcli's save
path (adapter_io.adapter_tensors on every process, write_adapter on the main one). Rank 0 also trains an
unsharded copy on the whole batch and writes it as the reference."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from peftcli import adapter_io
from peftcli.methods import build_method

META = {"base": {"name_or_path": "tiny-llama", "task": "causal-lm"}}


def train(model, ids: torch.Tensor, steps: int = 2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def main(tmp: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(tmp / "llama", dtype=torch.float32)
    torch.manual_seed(0)
    method = build_method({"name": "lora", "r": 4, "target_modules": "all-linear"})
    method.apply(model)
    with torch.no_grad():  # B = 0 would leave A's gradient zero: move it so both factors train
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    ids = torch.randint(5, 1000, (2 * world, 12), generator=torch.Generator().manual_seed(2))

    if rank == 0:
        ref = copy.deepcopy(model)
        train(ref, ids)
        adapter_io.write_adapter(tmp / "single", method, ref, META)

    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    train(model, ids[2 * rank:2 * rank + 2])  # equal token counts: the averaged gradient is the whole batch's
    lora_a = next(p for n, p in model.named_parameters() if n.endswith("lora_A.weight"))
    tensors = adapter_io.adapter_tensors(method, model)  # every process: all-gathers the shards
    if rank == 0:
        adapter_io.write_adapter(tmp / "fsdp", method, model, META, tensors=tensors)
        adapter_io.atomic_write(tmp / "fsdp" / "sharded.json", json.dumps({"lora_A_local_rows": lora_a.to_local().shape[0]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
