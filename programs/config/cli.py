"""Loading a YAML file, CLI overrides (`--key value`, `--kebab-key=v`, `--a.b v`), `--help`."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from programs.config.schema import SECTIONS, Config, ConfigError, TRLConfig
from programs.config.unsupported import LEGACY_ALIASES, NOT_SUPPORTED_YET, refuses_every_value
from programs.config.validate import _closest, _field_type_name, _type_name, validate


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        choices = sorted(p.name for p in path.iterdir() if p.suffix in (".yml", ".yaml"))
        raise ConfigError(f"{path} is a folder; pass one of its config files: {', '.join(choices) or '(none found)'}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where}: invalid YAML: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def _flag_key(flag: str) -> str:
    """`--learning-rate` / `--learning_rate` -> `learning_rate`; `--trl.beta` -> `trl.beta`."""
    return flag.lstrip("-").replace("-", "_")


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"--{dotted}: {'.'.join(parts[:i])} has no entry {idx}")
            node = node[idx]
            continue
        if node.get(part) is None:
            node[part] = [] if nxt_is_index else {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--{dotted}: {'.'.join(parts[: i + 1])} is not a mapping")
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"--{dotted}: no entry {idx}")
        node[idx] = value
    else:
        node[last] = value


def _is_bool_key(key: str) -> bool:
    field = Config.model_fields.get(key)
    return field is not None and "bool" in _type_name(field.annotation)


def _is_trl_bool_key(key: str) -> bool:
    field = TRLConfig.model_fields.get(key)
    return field is not None and "bool" in _type_name(field.annotation)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `--key value`, `--key=value`, `--kebab-key value` and `--a.b value` overrides.

    Values are YAML scalars (`1e-4`, `true`, `[a, b]`); a boolean key given alone means true;
    `None`/`null` values are dropped like axolotl does. A `trl:` key that is no top-level key may
    be given bare: `--use_vllm true` sets `trl.use_vllm`.
    """
    raw = copy.deepcopy(raw)
    items = list(overrides)
    i = 0
    while i < len(items):
        flag = items[i]
        if not flag.startswith("--") or flag == "--":
            raise ConfigError(f"unexpected argument {flag!r}; overrides look like --key value")
        if "=" in flag:
            name, text = flag.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not items[i + 1].startswith("--"):
            name, text = flag, items[i + 1]
            i += 2
        else:
            name, text = flag, None
            i += 1
        key = _flag_key(name)
        top = key.split(".")[0]
        if top not in Config.model_fields and top not in LEGACY_ALIASES and top in TRLConfig.model_fields:
            key = f"trl.{key}"
        elif top not in Config.model_fields and top not in LEGACY_ALIASES:
            raise ConfigError(f"unknown option {name!r}{_closest(top, Config.model_fields)}")
        if text is None:
            if not (_is_bool_key(top) or (key.startswith("trl.") and _is_trl_bool_key(key[4:]))):
                raise ConfigError(f"{name} needs a value")
            value: Any = True
        else:
            value = _parse_scalar(text)
        if value is None:
            continue
        _set_dotted(raw, key, value)
    return raw


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply CLI overrides, validate and normalise it."""
    raw = _read_yaml(Path(path))
    if raw.get("strict") is True:
        _check_strict_overrides(raw, overrides, path)
    raw = apply_overrides(raw, overrides)
    return validate(raw)


def _check_strict_overrides(raw: dict[str, Any], overrides, path) -> None:
    """axolotl's `strict: true`: the CLI may override only keys the YAML file sets (axolotl drops
    the others without a word; here they are an error)."""
    for flag in overrides:
        if not flag.startswith("--"):
            continue
        key = _flag_key(flag.split("=", 1)[0]).split(".")[0]
        if key not in raw and LEGACY_ALIASES.get(key) not in raw:
            raise ConfigError(f"{flag.split('=', 1)[0]}: {path} sets strict: true, so the command line may only "
                              f"override keys the file sets, and {key!r} is not one of them")


def write_resolved_config(config: Config, output_dir: str | os.PathLike) -> Path:
    """Write the resolved config (every key, defaults filled) to `output_dir/config.yaml`, atomically."""
    from backends.atomic import atomic_write

    target = Path(output_dir) / "config.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
    return target


def help_text(description: str = "") -> str:
    """`--help`: every key with its type and default, by section, generated from the schema."""
    lines = [description, "", "usage: python -m programs.<name> --config x.yaml [--key value ...]", ""]
    lines.append("Every config key is also an option: --learning-rate 1e-4, --learning_rate=1e-4, --trl.beta 0.1")
    for title, section in SECTIONS:
        lines.append("")
        lines.append(f"{title}:")
        for name in section.__annotations__:
            field = Config.model_fields.get(name)
            if field is None:
                continue
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = f"default {value!r}"
            flag = "--" + name.replace("_", "-")
            note = _support_note(name)
            lines.append(f"  {flag:<40} {_field_type_name(field)}; {default}{note}")
    return "\n".join(lines)


def _support_note(name: str) -> str:
    """`--help`'s mark: every value but the default refused, or only some values."""
    if name not in NOT_SUPPORTED_YET:
        return ""
    return "  [not supported yet]" if refuses_every_value(name) else "  [some values not supported yet]"


def parse_cli(
    argv: list[str] | None,
    description: str = "",
    program_flags: dict[str, bool] | None = None,
) -> tuple[Config, list[str]]:
    """The config of a program run as `python -m programs.x --config x.yaml [--key value]...`.

    `program_flags` maps the program's own options (`--debug`) to whether they take a value;
    those are returned untouched in `extra_args`. Any other option must be a config key.
    `--help` prints the generated key list and exits. A first positional `x.yaml` is accepted
    too (axolotl's `preprocess config.yml`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    program_flags = dict(program_flags or {})
    if "-h" in argv or "--help" in argv:
        print(help_text(description))
        raise SystemExit(0)
    config_path: str | None = None
    overrides: list[str] = []
    extra: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if name == "--config":
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
                i += 1
            elif i + 1 < len(argv):
                config_path = argv[i + 1]
                i += 2
            else:
                raise ConfigError("--config needs a path to a YAML file")
            continue
        if not arg.startswith("-") and config_path is None and i == 0:
            config_path = arg
            i += 1
            continue
        flag = "--" + name.lstrip("-").replace("_", "-")
        if flag in program_flags:
            takes_value = program_flags[flag]
            extra.append(arg)
            if takes_value and "=" not in arg:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                extra.append(argv[i + 1])
                i += 1
            i += 1
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        key = _flag_key(name).split(".")[0]
        if key not in Config.model_fields and key not in LEGACY_ALIASES and key not in TRLConfig.model_fields:
            options = list(Config.model_fields) + [f.lstrip("-").replace("-", "_") for f in program_flags]
            raise ConfigError(f"unknown option {name!r}{_closest(key, options)}")
        overrides.append(arg)
        if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(argv[i + 1])
            i += 1
        i += 1
    if config_path is None:
        raise ConfigError("--config is required: python -m programs.<name> --config x.yaml")
    return load_config(config_path, overrides), extra


