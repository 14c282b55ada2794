"""Stage configs are small kw-only dataclasses; this module turns them into argparse
options (one flag per field, help from the field's docstring-like `help` metadata) and
back, so every stage has the same command-line conventions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any, Callable


def field(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
          path: bool = False, model: bool = False, keywords: tuple[str, ...] = (), **kw) -> Any:
    """A dataclass field carrying its command-line help (and optionally a positional flag).
    `path=True` marks a local path or URL that `absolute_paths` resolves; `model=True` a path
    that may also be a Hugging Face Hub id (`miniplm.hub`), resolved before the config is built;
    `keywords` are values of such a field that are names, not paths (`sample`, `teacher`)."""
    meta = {"help": help, "flag": flag, "path": path or model, "model": model, "keywords": keywords}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(element type, is_list) for annotations like `int`, `str | None`, `list[str]`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--field-name` option per dataclass field; fields with flag='positional' are positional."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, is_list = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.metadata.get("flag") == "positional":
            parser.add_argument(f.name, nargs="+" if is_list else None, type=tp, help=help_text)
            continue
        name = "--" + f.name.replace("_", "-")
        if tp is bool:
            parser.add_argument(name, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            default = None if required else (f.default_factory() if f.default_factory
                                             is not dataclasses.MISSING else f.default)
            if not required and default is not None:
                help_text += f" (default: {default})"
            parser.add_argument(name, dest=f.name, type=tp, nargs="+" if is_list else None,
                                required=required, default=default, help=help_text)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**resolve_hub_ids(cls, {k: v for k, v in vars(ns).items() if k in names}))


def resolve_hub_ids(cls: type, values: dict, prefix: str = "",
                    resolver: Callable[[str], str] | None = None) -> dict:
    """`values` with each `model=True` field that names a Hub id (and no local folder) replaced
    by its snapshot folder: every check and every worker then sees a local checkpoint, whose
    path names the commit. `resolver` (default `hub.resolve`) turns an id into that folder."""
    from miniplm import hub

    resolver = resolver or hub.resolve
    out = dict(values)
    for f in dataclasses.fields(cls):
        value = out.get(f.name)
        if f.metadata.get("model") and isinstance(value, str) and value not in f.metadata.get("keywords", ()) \
                and hub.is_hub_id(value):
            try:
                out[f.name] = resolver(value)
            except ValueError as err:
                raise ValueError(f"{prefix}{f.name}: {err}") from None
    return out


def absolute_path(value: str) -> str:
    """A local path made absolute against this process's working directory (`~` expanded);
    URLs (`s3://`, `gs://`, `file://`) unchanged. Ray workers run in other directories, so no
    relative path may reach them."""
    if "://" in value or os.path.isabs(os.path.expanduser(value)):
        return value if "://" in value else os.path.expanduser(value)
    if _submitted_job_working_dir():
        # the driver of `ray job submit --working-dir` runs in Ray's temporary copy of that
        # folder: output written there is lost, and inputs are only what was uploaded
        raise ValueError(f"{value!r} is a relative path, and this job runs in Ray's copy of its "
                         f"working directory ({os.getcwd()}); give an absolute path on storage "
                         "every node sees, or a URL (s3://, gs://)")
    return os.path.abspath(os.path.expanduser(value))


def _submitted_job_working_dir() -> bool:
    """Whether this process is the driver of a `ray job submit` job with a working_dir."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not job:
        return False
    try:
        return bool(json.loads(job).get("runtime_env", {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def absolute_paths(cfg: Any, prefix: str = "") -> Any:
    """A copy of a (nested) config with every `path=True` field resolved by `absolute_path`:
    the one place where user paths are fixed, at the CLI / config boundary."""
    changes = {}
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if f.metadata.get("path"):
            keep = f.metadata.get("keywords", ())

            def resolve(v):
                if v is None or v in keep:
                    return v
                try:
                    return absolute_path(v)
                except ValueError as err:
                    raise ValueError(f"{key}: {err}") from None

            new = [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
        elif dataclasses.is_dataclass(value):
            new = absolute_paths(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            new = [absolute_paths(v, f"{key}[{i}].") for i, v in enumerate(value)]
        else:
            continue
        if new != value:
            changes[f.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def describe(cfg: Any) -> str:
    """The resolved config, printed at the start of every stage."""
    lines = [f"{type(cfg).__name__}:"]
    lines += [f"  {k}: {v}" for k, v in to_dict(cfg).items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- nested configs from YAML


def _coerce(value: Any, tp: Any, key: str, resolver: Callable[[str], str] | None = None) -> Any:
    """Turn YAML / command-line values into the annotated type, naming the key on failure."""
    base, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, base, f"{key}[{i}]", resolver) for i, v in enumerate(items)]
    if dataclasses.is_dataclass(base):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return build(base, value, prefix=f"{key}.", resolver=resolver)
    if base is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    if base in (int, float) and isinstance(value, str):
        try:
            return base(float(value)) if base is int else float(value)
        except ValueError:
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if base is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def build(cls: type, values: dict, prefix: str = "", resolver: Callable[[str], str] | None = None) -> Any:
    """A (nested) dataclass from a dict; unknown keys are an error naming the key. Hub ids are
    resolved by `resolver` (default `hub.resolve`: the model's files, weights included)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = resolve_hub_ids(cls, {k: _coerce(v, hints[k], prefix + k, resolver) for k, v in values.items()},
                             prefix, resolver)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field missing
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


def set_dotted(values: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` override (value parsed as YAML) to a nested dict; list items
    are addressed as `students[1].tokens=...`."""
    import re

    import yaml

    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    steps: list = []
    for part in key.strip().split("."):
        m = re.fullmatch(r"(\w+)((?:\[\d+\])*)", part)
        if not m:
            raise ValueError(f"--set {key}: cannot parse {part!r}")
        steps.append(m.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", m.group(2))]
    node = values
    for here, nxt in zip(steps, steps[1:]):
        if isinstance(here, int):
            if not isinstance(node, list) or here >= len(node):
                raise ValueError(f"--set {key}: no item [{here}]")
            node = node[here]
        else:
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {here} is not inside a section")
            node = node.setdefault(here, [] if isinstance(nxt, int) else {})
    value = yaml.safe_load(raw)
    if isinstance(steps[-1], int):
        if not isinstance(node, list) or steps[-1] > len(node):
            raise ValueError(f"--set {key}: no item [{steps[-1]}]")
        if steps[-1] == len(node):  # one past the end appends: `students[2]=...` adds a student
            node.append(value)
            return
    node[steps[-1]] = value


def load(cls: type, path: str | None = None, overrides: list[str] | None = None,
         resolver: Callable[[str], str] | None = None) -> Any:
    """A config from a YAML file (optional) plus dotted `key=value` overrides."""
    return build(cls, load_values(path, overrides), resolver=resolver)


def load_values(path: str | None = None, overrides: list[str] | None = None) -> dict:
    """The plain values of a YAML file (optional) with dotted `key=value` overrides applied."""
    import yaml

    values: dict = {}
    if path:
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except OSError as err:  # a folder, no permission
            raise ValueError(f"{path}: cannot read the config file ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ValueError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
    for assignment in overrides or []:
        set_dotted(values, assignment)
    return values
