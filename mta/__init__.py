"""mta: a high-volume Mail Transfer Agent core.

Public API: Server (the embeddable core), load_config / Config / ConfigError,
SpoolError. Everything else is internal to its subpackage. Importing mta
fails loudly if the native extensions were not built: there is no
pure-Python fallback.
"""
try:
    from mta._native import queues as _queues_ext, spool as _spool_ext, wire as _wire_ext  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        f"mta's native extension is missing ({exc.name or exc}); build it with "
        "'python3 setup.py build_ext --inplace' or 'bash tools/dev.sh setup'") from exc

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mta.config import Config, ConfigError, load_config
    from mta.server import Server
    from mta.spool import SpoolError

__version__ = "0.1.0"
__all__ = ["Config", "ConfigError", "Server", "SpoolError", "load_config", "__version__"]

# Loaded on first use (PEP 562): a process that needs one stage (the bounce parser's
# children, CLI tools) does not import the whole daemon, aiohttp included, to get it.
_PUBLIC = {"Config": "mta.config", "ConfigError": "mta.config", "load_config": "mta.config",
           "Server": "mta.server", "SpoolError": "mta.spool"}


def __getattr__(name: str):
    home = _PUBLIC.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):   # a subpackage as an attribute: mta.config after `import mta`
        try:
            return importlib.import_module(f"mta.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"mta.{name}":
                raise
    raise AttributeError(f"module 'mta' has no attribute {name!r}")
