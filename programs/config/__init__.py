"""The one config schema: axolotl's YAML keys, their documented defaults, validation and CLI overrides.

    config = load_config("x.yaml", ["--learning-rate", "1e-4", "--trl.beta=0.1"])

Everything a program needs from a YAML file goes through here, once, at the edge: unknown keys get
the closest valid key, wrong types and out-of-range values name the key and what was expected, and
features axolotl has but puretune has not built yet fail early with one line (`NOT_SUPPORTED_YET`).
Inside the project, functions take the few plain values they need (`data_settings(config)`), not
the whole config.
"""
from programs.config.schema import (
    OPTIMIZER_NAMES, SUPPORTED_OPTIMIZERS, Config, ConfigError, DatasetConfig, TRLConfig,
)
from programs.config.unsupported import LEGACY_ALIASES, NOT_SUPPORTED_YET
from programs.config.validate import validate
from programs.config.cli import apply_overrides, help_text, load_config, parse_cli, write_resolved_config
from programs.config.derived import data_settings, training_kind

__all__ = [
    "Config", "ConfigError", "DatasetConfig", "TRLConfig", "LEGACY_ALIASES", "NOT_SUPPORTED_YET",
    "OPTIMIZER_NAMES", "SUPPORTED_OPTIMIZERS", "apply_overrides", "data_settings", "help_text",
    "load_config", "parse_cli", "training_kind", "validate", "write_resolved_config",
]
