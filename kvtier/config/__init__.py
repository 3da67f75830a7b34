"""Layer 0: kvtier's one validated configuration.

``load_config`` reads a YAML file, then ``KVTIER_*`` environment variables, then the
engine's extra config (later wins) into the pydantic models of ``sections`` (and
``cluster`` for the controller, transfer channel and peer tier), built from the value
types of ``fields``; ``values`` holds the closed sets (tier names, codecs) and parsing
of sizes and addresses, ``secrets`` the one reader of bearer tokens (files and
``KVTIER_<SECTION>__TOKEN``, used by the CLIs too) and of the integrity key (a file only).
"""

from kvtier.config.cluster import ControllerConfig, PeerConfig, TransferConfig, parse_address
from kvtier.config.load import load_config
from kvtier.config.secrets import (MIN_KEY_BYTES, cli_token, env_token, read_key_file,
                                   read_token, read_token_file, token_env)
from kvtier.config.sections import (ControlConfig, DiskConfig, IntegrityConfig, KvtierConfig,
                                    MemoryConfig, RedisConfig, VerifyConfig)
from kvtier.config.tls import TlsConfig, is_wildcard, require_tls
from kvtier.config.values import (CodecName, TierName, WritePolicy, is_loopback, parse_size,
                                  redact_url)
from kvtier.errors import ConfigError

__all__ = ["MIN_KEY_BYTES", "CodecName", "ConfigError", "ControlConfig", "ControllerConfig",
           "DiskConfig", "IntegrityConfig", "KvtierConfig", "MemoryConfig", "PeerConfig",
           "RedisConfig", "TierName", "TlsConfig", "TransferConfig", "VerifyConfig",
           "WritePolicy", "cli_token", "env_token", "is_loopback", "is_wildcard", "load_config",
           "parse_address", "parse_size", "read_key_file", "read_token", "read_token_file",
           "redact_url", "require_tls", "token_env"]
