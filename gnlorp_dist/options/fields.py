"""How an option is declared: :func:`option` (a field with its flag's choices), :func:`shared`
(a field of another group, docstring and choices included) and :func:`field_docs` (the
docstring under each field, which is the flag's ``--help`` text).

Only the standard library: the optimizer's option groups (a layer below ``integrations``) are
built with these too.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from collections.abc import Sequence
from typing import Any

# The metadata keys a field may carry; each goes to ``ArgumentParser.add_argument`` as it is
# (``nargs``: a tuple field's, "+" unless given; "*" lets the flag alone mean an empty tuple).
ARGUMENT_KEYS = ("help", "choices", "metavar", "aliases", "nargs")


@dataclasses.dataclass(frozen=True)
class ResumeRule:
    """How a resumed run treats a field whose value differs from its checkpoint's, declared in
    the field's annotation (``rank: Annotated[int | None, MUST_MATCH] = None``). An annotation,
    not field metadata: transformers' stock ``HfArgumentParser`` hands every metadata key to
    ``add_argument`` and would refuse one, whereas it reads types without ``Annotated`` extras.
    A field without a rule may change on a resume (the log interval, the step count)."""

    name: str
    """``must_match`` or ``overridable``."""


MUST_MATCH = ResumeRule("must_match")
"""The value shapes the optimizer state or its meaning (a projection key that the state's
param groups would silently restore, the moments' storage), the model, or the data order: a
resume with another value is refused, naming the checkpoint's value."""
OVERRIDABLE = ResumeRule("overridable")
"""Like :data:`MUST_MATCH`, unless the resume names it explicitly (``--override lr=...``)."""


def option(
    default: Any = dataclasses.MISSING,
    *,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    aliases: Sequence[str] = (),
    help: str | None = None,  # noqa: A002  (add_argument's name)
) -> Any:
    """A dataclass field whose flag takes ``choices`` (shown as ``metavar``) and is also spelled
    ``aliases``; its help is the docstring under the field unless ``help`` is given."""
    metadata: dict[str, Any] = {}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if metavar is not None:
        metadata["metavar"] = metavar
    if aliases:
        metadata["aliases"] = list(aliases)
    if help is not None:
        metadata["help"] = help
    return dataclasses.field(default=default, metadata=metadata)


def shared(group: type, name: str, **changes: Any) -> Any:
    """Field ``name`` of the option group ``group`` for a config that uses it without the rest
    of the group: the same docstring (so the same ``--help``) and choices, the group's default
    unless ``changes`` gives ``default`` (a config whose default differs says why in the
    group's docstring). ``changes`` may also replace ``choices`` (the shared-flag test lists
    where that is allowed) and add ``aliases`` (other spellings of the flag)."""
    source = {f.name: f for f in dataclasses.fields(group)}[name]
    metadata = {**source.metadata, "help": field_docs(group)[name]}
    if "choices" in changes:
        metadata["choices"] = tuple(changes.pop("choices"))
    if "aliases" in changes:
        metadata["aliases"] = list(changes.pop("aliases"))
    default = changes.pop("default", source.default)
    if changes:
        raise TypeError(f"shared({group.__name__}, {name!r}): unknown changes {sorted(changes)}")
    return dataclasses.field(default=default, metadata=metadata)


def resume_rule_fields(config_type: type, rule: ResumeRule) -> tuple[str, ...]:
    """The fields of the dataclass ``config_type`` whose annotation carries ``rule``
    (``Annotated[..., rule]``), in field order: what a resume compares with its checkpoint, read
    from the declarations so that a new option is compared as soon as it is declared so."""
    hints = typing.get_type_hints(config_type, include_extras=True)
    return tuple(
        f.name
        for f in dataclasses.fields(config_type)
        if rule in getattr(hints[f.name], "__metadata__", ())
    )


def _class_field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under the fields in ``cls``'s own body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): flags just lose their help text
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """The help text of every field of the dataclass ``cls``: a ``help`` given to the field,
    else the docstring under it in the nearest class of ``cls``'s MRO that has one (a config
    that only changes an inherited field's default keeps the group's docstring)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_class_field_docs(klass))
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            docs[f.name] = f.metadata["help"]
    return {f.name: docs[f.name] for f in dataclasses.fields(cls) if f.name in docs}
