"""What a resumed ``gnlorp-train`` run must share with its checkpoint, and what it may change.

The options tree declares it (:mod:`gnlorp_dist.options.fields`): a field annotated
``Annotated[..., MUST_MATCH]`` shapes the optimizer state or its meaning (every projection and moment
option is a param-group key that the saved state would silently restore, or whose state has
another shape), the model, or the data order; a resume with another value is refused, each
difference named with the flag that restores the checkpoint's value. A field marked
``OVERRIDABLE`` (the peak lr, whose change is the documented way out of a diverging run) is
refused the same way unless the resume says ``--override lr=VALUE``: then the new value is
applied after the checkpoint is loaded, logged, and recorded in ``run_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from gnlorp_dist.options.fields import MUST_MATCH, OVERRIDABLE, resume_rule_fields

MODEL_SHAPE_KEY = "llama_config"
"""The run record's key holding the model's shape (compared with the declared fields)."""


class RunSettings(Protocol):
    """A run's configuration dataclass (gnlorp-train's ``RunConfig``; not imported: its module
    imports this one), whose annotations carry the resume rules."""

    override: tuple[str, ...]


Settings = TypeVar("Settings", bound=RunSettings)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _override_type(config_type: type, name: str) -> type:
    hint = typing.get_type_hints(config_type)[name]
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    assert len(kinds) == 1 and kinds[0] in (int, float, str), (name, hint)
    return kinds[0]


def parse_overrides(config: RunSettings) -> dict[str, Any]:
    """``{name: value}`` of ``--override NAME=VALUE``; ValueError for a setting that cannot be
    overridden, a malformed item, or a value that contradicts the setting's own flag."""
    config_type = type(config)
    allowed = resume_rule_fields(config_type, OVERRIDABLE)
    fixed = resume_rule_fields(config_type, MUST_MATCH)
    known = {f.name for f in dataclasses.fields(config_type)}
    values: dict[str, Any] = {}
    for item in config.override:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not text.strip():
            raise ValueError(f"--override {item!r}: write NAME=VALUE, e.g. --override lr=0.005")
        if name in fixed:
            raise ValueError(
                f"--override {item}: {name} shapes the optimizer state, the model or the data "
                f"order, so a resume cannot change it; train with {_flag(name)} {text} from "
                "scratch in another --output-dir"
            )
        if name not in allowed:
            why = f"{_flag(name)} changes freely on resume: pass it" if name in known else "unknown"
            raise ValueError(
                f"--override {item}: {name} is not a setting a resume overrides ({why}); "
                f"--override takes {', '.join(allowed)}"
            )
        try:
            value = _override_type(config_type, name)(text.strip())
        except ValueError:
            raise ValueError(f"--override {item}: {text!r} is not a valid {name}") from None
        given = getattr(config, name)
        if given is not None and given != value:
            raise ValueError(
                f"--override {item} and {_flag(name)} {given} disagree; pass one of them"
            )
        values[name] = value
    return values


def apply_overrides(config: Settings) -> Settings:
    """``config`` with each ``--override NAME=VALUE`` as the setting's value (checked by
    :func:`parse_overrides`); the ``override`` field keeps the items, so the record says so."""
    values = parse_overrides(config)
    return dataclasses.replace(config, **values) if values else config


def _json_default(config_type: type, name: str) -> Any:
    """What a checkpoint written before field ``name`` existed ran with: its default."""
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    if name not in fields or fields[name].default is dataclasses.MISSING:
        return None
    return json.loads(json.dumps(fields[name].default))


def _restore_flag(name: str, old: Any, config_type: type) -> str:
    """The command-line words that give field ``name`` the checkpoint's value ``old``."""
    flag = _flag(name)
    if isinstance(old, bool):
        default = _json_default(config_type, name)
        if old:
            return f"pass {flag}"
        return f"pass --no-{flag[2:]}" if default is True else f"drop {flag}"
    if old is None:
        return f"drop {flag}"
    if isinstance(old, list):
        return f"pass {flag} {' '.join(map(str, old))}"
    return f"pass {flag} {old}"


def _model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    old, new = saved.get(MODEL_SHAPE_KEY) or {}, current.get(MODEL_SHAPE_KEY) or {}
    if saved.get("model_config"):
        fix = f"--model-config {saved['model_config']}"
    else:
        fix = f"--model {saved.get('model')}"
    return [
        f"{MODEL_SHAPE_KEY}.{sub}: checkpoint {old.get(sub)!r}, now {new.get(sub)!r} (pass {fix})"
        for sub in sorted(old.keys() | new.keys())
        if old.get(sub) != new.get(sub)
    ]


def resume_differences(
    saved: dict[str, Any], current: dict[str, Any], config_type: type, overridden: set[str]
) -> tuple[list[str], list[str]]:
    """``(refused, overridden)`` descriptions of the declared settings whose value in the run
    record ``current`` differs from the checkpoint's record ``saved`` (a key the checkpoint
    lacks counts as the field's default); ``overridden``: names the resume overrides."""
    refused, changed = [], []
    for name in resume_rule_fields(config_type, MUST_MATCH):
        old = saved.get(name, _json_default(config_type, name))
        new = current.get(name, _json_default(config_type, name))
        if old != new:
            fix = _restore_flag(name, old, config_type)
            refused.append(f"{name}: checkpoint {old!r}, now {new!r} ({fix})")
    for name in resume_rule_fields(config_type, OVERRIDABLE):
        old, new = saved.get(name), current.get(name)
        if old == new:
            continue
        if name in overridden:
            changed.append(f"{name}: checkpoint {old!r}, now {new!r}")
        else:
            refused.append(
                f"{name}: checkpoint {old!r}, now {new!r} (pass {_flag(name)} {old}, or "
                f"--override {name}={new} to change it knowingly)"
            )
    return refused + _model_differences(saved, current), changed


def check_resume_settings(
    saved: dict[str, Any],
    current: dict[str, Any],
    config: RunSettings,
    checkpoint: str,
    log: Callable[[str], None],
) -> None:
    """ValueError naming every declared setting of ``config`` (its record ``current``) that
    differs from the checkpoint's record ``saved``, with the flag that restores it, before
    anything is loaded; each ``--override`` that changes a setting is logged."""
    overridden = set(parse_overrides(config))
    refused, changed = resume_differences(saved, current, type(config), overridden)
    if refused:
        raise ValueError(
            f"checkpoint {checkpoint} is incompatible with this run ({'; '.join(refused)}). "
            "These settings shape the optimizer state, the model or the data order that the "
            "checkpoint holds: resume with the checkpoint's values, or train the new settings "
            "from scratch in another --output-dir (--resume never in a fresh one)"
        )
    for change in changed:
        log(f"resuming {checkpoint} with --override: {change} (recorded in run_config.json)")
