"""Layer 0: kvtier's one validated configuration.

``load_config`` reads a YAML file, then ``KVTIER_*`` environment variables, then the
engine's extra config (later wins) into the dataclasses of ``sections`` (and
``cluster`` for the controller, transfer channel and peer tier); ``values`` holds the
value types (tier names, codecs, sizes, tokens) they share.
"""

from kvtier.config.cluster import ControllerConfig, PeerConfig, TransferConfig, parse_address
from kvtier.config.load import load_config
from kvtier.config.sections import (ControlConfig, DiskConfig, KvtierConfig, MemoryConfig,
                                    RedisConfig)
from kvtier.config.values import (CodecName, TierName, WritePolicy, is_loopback, parse_size,
                                  read_token, redact_url)
from kvtier.errors import ConfigError

__all__ = ["CodecName", "ConfigError", "ControlConfig", "ControllerConfig", "DiskConfig",
           "KvtierConfig", "MemoryConfig", "PeerConfig", "RedisConfig", "TierName",
           "TransferConfig", "WritePolicy", "is_loopback", "load_config", "parse_address",
           "parse_size", "read_token", "redact_url"]
