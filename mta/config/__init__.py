"""Configuration: the typed key tables (schema.py) and the TOML loader (load.py).

The daemon calls load_config() once at start-up; each component then reads only its own
section dataclass. Raises ConfigError (fatal) with every problem in the file.
"""

from mta.config.load import DEFAULT_CONFIG_PATH, ConfigError, load_config, parse_config
from mta.config.schema import (
    Config,
    DkimConfig,
    ListenerConfig,
    LogConfig,
    ReceptionConfig,
    ServerConfig,
    SpoolConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "ConfigError",
    "DkimConfig",
    "ListenerConfig",
    "LogConfig",
    "ReceptionConfig",
    "ServerConfig",
    "SpoolConfig",
    "load_config",
    "parse_config",
]
