"""Method registry. Each module in this package defines one method family and registers its
methods with @register; modules are discovered, so adding a method touches no other file.

Discovery imports every module whose name does not start with "_": put helpers shared by several
methods in a "_name.py" module (or in base.py / targets.py, which register nothing). Everything other
files need to know about a method (its HF PEFT peft_type, options, wrapper) is read from the registered
class: see the `Method` docstring in base.py."""

from __future__ import annotations

import importlib
import pkgutil

from peftcli.errors import UserError, did_you_mean

_REGISTRY: dict[str, type] = {}
_loaded = False


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str):
    _load_all()
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}{did_you_mean(name, _REGISTRY)}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(options):
    """Options (validated pydantic model or plain dict with `name`) -> method instance."""
    if isinstance(options, dict):
        options = get_method(options.get("name")).Options.model_validate(options)
    return get_method(options.name)(options)


def peft_types_read() -> list[str]:
    """The HF PEFT peft_types some registered method reads (adapters written by other tools)."""
    _load_all()
    return sorted({t for cls in _REGISTRY.values() for t in cls.reads_peft_types()})


def peft_types_written() -> list[str]:
    """The HF PEFT peft_types registered methods write (their adapters load in HF PEFT)."""
    _load_all()
    return sorted({cls.peft_type for cls in _REGISTRY.values() if cls.peft_type})


def method_for_peft_config(cfg: dict):
    """The registered method class that reads a foreign adapter_config.json, or None."""
    _load_all()
    return next((cls for _, cls in sorted(_REGISTRY.items()) if cls.reads_peft_config(cfg)), None)
