"""Method registry. Each module in this package defines one method family and registers its
methods with @register; modules are discovered, so adding a method touches no other file."""

from __future__ import annotations

import importlib
import pkgutil

from peftcli.errors import UserError, did_you_mean

_REGISTRY: dict[str, type] = {}
_NOT_METHODS = {"base", "targets"}
_loaded = False


def register(cls):
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
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
