"""`peftcli export --format peft`: the adapter as deployment tools read it (HF PEFT layout only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from peftcli import adapter_io
from peftcli.errors import UserError


def export_peft(adapter_path: str | Path, output: str | Path, overwrite: bool = False) -> dict:
    adapter = adapter_io.read_adapter(adapter_path)
    peft_type = adapter.config.get("peft_type")
    if not adapter_io.loads_in_peft(peft_type):
        method = adapter_io.method_for(adapter)
        how = ("use `peftcli export --format merged`" if method.mergeable else
               "deploy the adapter directory with peftcli" + (", or `peftcli merge --partial` (the mergeable parts folded in)"
                                                              if any(p.mergeable for p in getattr(method, "parts", [])) else ""))
        raise UserError(f"{adapter.path}: a {peft_type} adapter has no HF PEFT layout; {how}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite or choose another directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.export-"))
    try:
        for name in (adapter_io.CONFIG, adapter_io.WEIGHTS, "README.md"):
            if (adapter.path / name).is_file():
                shutil.copy2(adapter.path / name, tmp / name)
        if adapter.weights.name == adapter_io.LEGACY_WEIGHTS:  # a legacy .bin is written as safetensors
            from safetensors.torch import save_file

            tensors = {k: v.contiguous() for k, v in adapter_io.load_tensors(adapter).items()}
            save_file(tensors, str(tmp / adapter_io.WEIGHTS), metadata={"format": "pt"})
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"output": str(output), "peft_type": peft_type, "files": sorted(p.name for p in output.iterdir())}
