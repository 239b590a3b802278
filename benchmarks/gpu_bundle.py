"""Wheels for the lent GPU machine, which has no network: ``make gpu-bundle`` (python3 + pip only).

    python3 -m benchmarks.gpu_bundle            # fill .whl/ (git-ignored), print the table
    python3 -m benchmarks.gpu_bundle --refresh  # re-pick the newest allowed version of unpinned deps

The machine's image already holds torch, transformers, accelerate, peft, numpy ... (its list is
``benchmarks/gpu_image.txt``). What ``gnlorp_dist``, ``benchmarks/gpu_check.py`` and
``tests/gpu`` import beyond that travels as wheels in ``.whl/``, carried with the working tree
(64 MiB in all) and installed there by ``benchmarks/gpu_check.sh`` with
``pip install --no-index --no-deps --target``. Because that install takes no dependencies, this
script resolves them itself, recursively, against the image's list:

- roots: the ``dependencies`` of pyproject.toml, the dev extras the GPU check reaches
  (:data:`DEV_ROOTS`), and :data:`NO_DEPS_ROOTS` (data files only, taken without their
  dependencies, as ``make setup`` installs them);
- each needed distribution's wheel is downloaded for CPython 3.12 on manylinux x86-64 and its
  METADATA ``Requires-Dist`` read, markers evaluated for that machine (:data:`MARKER_ENV`), extras
  followed only where a requirer asked for them; every requirement the image lacks joins the
  bundle;
- versions: constraints.txt's pin where it gives one, else the newest version allowed by every
  requirer's specifier (an already downloaded wheel that still satisfies them is kept, so a second
  run downloads nothing; ``--refresh`` re-picks);
- where the image's version is known, every requirer's specifier is checked against it: a
  conflict is an error (a wheel installed with ``--no-deps`` would otherwise fail at import time
  on the machine, after device time was spent);
- DeepSpeed ships as an sdist: its wheel is built here with every op off (``DS_BUILD_OPS=0``, ops
  compile just in time there), in pip's isolated build environment, which holds setuptools and
  wheel but never torch (setup.py tolerates that), then checked to be pure Python and to install.

Exactly one version of each distribution is kept in ``.whl/`` (two would stop pip). The script
prints what it bundled, writes ``.whl/bundle.json``, and exits 1 if the working tree that travels
plus the wheels exceed :data:`TRAVEL_LIMIT_MIB`.

The resolution itself (:func:`resolve` and the functions it uses) is pure: it asks a ``fetch``
callable for a version's METADATA, so tests/unit/test_gpu_bundle.py checks it without a network.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    from pip._vendor import tomli as tomllib

from benchmarks.gpu_resolve import (
    NO_DEPS_ROOTS,
    NOT_BUNDLED,
    PYTHON_VERSION,
    BundleError,
    Candidate,
    Resolution,
    SpecifierSet,
    Version,
    allowed,
    canonicalize_name,
    check_image,
    parse_wheel_filename,
    project_roots,
    read_image,
    read_pins,
    requirement,
    resolve,
    stale_wheels,
    travelling_bytes,
    wheel_metadata,
    wheel_of,
)

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".whl"
IMAGE_FILE = REPO / "benchmarks" / "gpu_image.txt"
MANIFEST = "bundle.json"

PLATFORMS: tuple[str, ...] = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    *(f"manylinux_2_{n}_x86_64" for n in (*range(29, 40), *range(18, 27))),
)
"""pip matches ``manylinux_2_N`` exactly, so every N the machine's glibc accepts is listed (the
device README: up to 39); the README's own list first, which pip prefers for equal versions."""

SDIST_BUILDS: dict[str, dict[str, str]] = {"deepspeed": {"DS_BUILD_OPS": "0"}}
"""Distributions published as an sdist only: built here into a wheel with this environment."""
TRAVEL_LIMIT_MIB = 60
"""Tree + wheels must stay under this: a device call carries 64 MiB at most (README), and the
rest is room for files other work leaves untracked."""


# -- fetching wheels (network) --------------------------------------------------------------------


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, env=env, check=False
    )


def _failed(what: str, done: subprocess.CompletedProcess) -> BundleError:
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    return BundleError(f"{what} failed (exit {done.returncode}):\n{tail}")


class WheelFetcher:
    """``fetch`` for :func:`resolve`: reuses a wheel in ``folder`` that satisfies the request,
    else downloads (or, for :data:`SDIST_BUILDS`, builds) it and drops other versions."""

    def __init__(self, folder: Path, refresh: bool = False) -> None:
        self.folder = folder
        self.refresh = refresh
        self.downloaded: list[str] = []

    def existing(self) -> dict[str, Candidate]:
        """Wheels already in the folder (one per distribution; the newest if several)."""
        found: dict[str, Candidate] = {}
        for path in sorted(self.folder.glob("*.whl"), key=lambda p: Version(wheel_of(p)[1])):
            name, version = wheel_of(path)
            found[name] = Candidate(version, wheel_metadata(path), path)
        return found

    def __call__(self, name: str, specifier: SpecifierSet, pin: str | None) -> Candidate:
        if not self.refresh or pin is not None:
            for path in self.folder.glob("*.whl"):
                wname, version = wheel_of(path)
                if wname == name and (version == pin if pin else allowed(version, specifier)):
                    return Candidate(version, wheel_metadata(path), path)
        wanted = f"{name}=={pin}" if pin else f"{name}{specifier}"
        with tempfile.TemporaryDirectory(prefix="gpu_bundle_") as tmp:
            if name in SDIST_BUILDS:
                built = build_sdist_wheel(wanted, Path(tmp), SDIST_BUILDS[name])
            else:
                built = download_wheel(wanted, Path(tmp))
            got, version = wheel_of(built)
            if got != name:
                raise BundleError(f"asked pip for {wanted!r}, got {built.name}")
            for old in self.folder.glob("*.whl"):
                if wheel_of(old)[0] == name:
                    old.unlink()
            target = self.folder / built.name
            shutil.move(str(built), target)
        self.downloaded.append(target.name)
        print(f"  fetched {target.name} ({target.stat().st_size / 2**20:.2f} MiB)", flush=True)
        return Candidate(version, wheel_metadata(target), target)


def download_wheel(wanted: str, tmp: Path) -> Path:
    """The newest wheel matching ``wanted`` for CPython 3.12 on manylinux x86-64 (or pure)."""
    args = ["download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION]
    args += ["--implementation", "cp"]  # pip then accepts the cp312, abi3 and none ABIs
    for platform in PLATFORMS:
        args += ["--platform", platform]
    done = _pip(*args, "-d", str(tmp), wanted)
    wheels = list(tmp.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise _failed(
            f"pip download {wanted!r} for CPython {PYTHON_VERSION} manylinux x86-64 (no wheel? "
            "an sdist-only project needs an entry in SDIST_BUILDS)",
            done,
        )
    return wheels[0]


def build_sdist_wheel(wanted: str, tmp: Path, build_env: dict[str, str]) -> Path:
    """Download ``wanted``'s sdist and build a pure-Python wheel of it with ``build_env``.

    pip's isolated build environment holds only the sdist's build requirements (setuptools and
    wheel for DeepSpeed, which has no pyproject.toml): torch, multi-GB as a CUDA build, is never
    installed, and DeepSpeed's setup.py then compiles nothing and records no op as installed.
    """
    src, out = tmp / "src", tmp / "out"
    done = _pip("download", "--no-deps", "--no-binary=:all:", "-d", str(src), wanted)
    sdists = list(src.glob("*.tar.gz")) + list(src.glob("*.zip"))
    if done.returncode != 0 or len(sdists) != 1:
        raise _failed(f"pip download of the sdist {wanted!r}", done)
    env = {**os.environ, **build_env}
    env.pop("PIP_NO_BUILD_ISOLATION", None)
    done = _pip("wheel", "--no-deps", "-w", str(out), str(sdists[0]), env=env)
    wheels = list(out.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        raise _failed(f"pip wheel {sdists[0].name} with {build_env}", done)
    check_pure_wheel(wheels[0])
    check_installs(wheels[0], tmp / "check")
    return wheels[0]


COMPILED = (".so", ".pyd", ".dll", ".dylib", ".o", ".a")


def check_pure_wheel(path: Path) -> None:
    """A built wheel must be ``py3-none-any`` with no compiled file, and (DeepSpeed) record no
    op as pre-built: the machine JIT-compiles ops against its own torch and CUDA."""
    _, _, _, tags = parse_wheel_filename(path.name)
    if {str(t) for t in tags} != {"py3-none-any"}:
        raise BundleError(f"{path.name}: built for {sorted(map(str, tags))}, not py3-none-any")
    with zipfile.ZipFile(path) as archive:
        compiled = [n for n in archive.namelist() if n.endswith(COMPILED)]
        if compiled:
            raise BundleError(f"{path.name} holds compiled files {compiled[:5]}: build ops off")
        info = [n for n in archive.namelist() if n.endswith("/git_version_info_installed.py")]
        for member in info:
            text = archive.read(member).decode()
            match = re.search(r"^installed_ops=(\{.*\})$", text, re.M)
            ops = ast.literal_eval(match.group(1)) if match else None
            if not isinstance(ops, dict) or any(ops.values()):
                raise BundleError(f"{path.name}: {member} lists pre-built ops {ops}; want none")


def check_installs(path: Path, target: Path) -> None:
    """The wheel installs the way gpu_check.sh installs it; its package imports if this Python
    has its runtime dependencies (torch), else only the files are checked (``make device-sim``
    imports it on the image's versions)."""
    done = _pip(
        "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", str(target),
        str(path),
    )  # fmt: skip
    if done.returncode != 0:
        raise _failed(f"pip install --target of {path.name}", done)
    name = wheel_of(path)[0].replace("-", "_")
    if not (target / name / "__init__.py").exists():
        raise BundleError(f"{path.name} installed no {name}/__init__.py")
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, check=False)
    if probe.returncode == 0:
        env = {**os.environ, "PYTHONPATH": str(target), "DS_ACCELERATOR": "cpu"}
        done = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, env=env,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise _failed(f"import {name} from the built wheel", done)
        print(f"  {path.name}: pure Python, no op built, installs and imports", flush=True)
    else:
        print(f"  {path.name}: pure Python, no op built, installs (no torch here to import it)")


def verify_site(site: Path) -> list[str]:
    """On the GPU machine, after the ``--no-deps --target`` install: every requirement of every
    bundled distribution (markers evaluated here, for real) met by what this Python imports,
    SITE included. The image versions the bundle could not check (unknown in gpu_image.txt) are
    checked here, in a second, before any section spends device time on an import error."""
    from importlib import metadata

    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        name = canonicalize_name(dist.metadata["Name"])
        if name in NO_DEPS_ROOTS:
            continue
        for req in map(requirement, dist.requires or []):
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                have = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {req}: not installed")
                continue
            if not allowed(have, req.specifier):
                problems.append(f"{name} needs {req}: found {req.name} {have}")
    return sorted(set(problems))


# -- the report -----------------------------------------------------------------------------------


def report_rows(resolution: Resolution) -> list[dict]:
    """One row per bundled distribution, for the table and bundle.json."""
    rows = []
    for name, need in resolution.bundle.items():
        cand = resolution.chosen[name]
        rows.append(
            {
                "dist": name,
                "version": cand.version,
                "file": cand.path.name if cand.path else None,
                "bytes": cand.path.stat().st_size if cand.path else 0,
                "required_by": sorted(need.requirers),
                "no_deps": not need.follow,
            }
        )
    return rows


def table(rows: list[dict], total: int, tree: int) -> str:
    """The fixed-width table of bundled wheels, with the totals."""
    cells = [("dist", "version", "MiB", "required by")] + [
        (
            r["dist"] + (" (no deps)" if r["no_deps"] else ""),
            r["version"],
            f"{r['bytes'] / 2**20:.2f}",
            ", ".join(r["required_by"]),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [
        f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}" for c in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 11)
    lines.append(
        f"{len(rows)} wheels, {total / 2**20:.2f} MiB; tree {tree / 2**20:.2f} MiB; "
        f"tree + wheels {(tree + total) / 2**20:.2f} MiB (limit {TRAVEL_LIMIT_MIB} MiB)"
    )
    return "\n".join(line.rstrip() for line in lines)


def notes(resolution: Resolution, image: dict[str, str | None], pins: dict[str, str]) -> list[str]:
    """What the bundle relies on without checking it: say it rather than hide it."""
    out = []
    for name, pin in sorted(pins.items()):
        have = image.get(name)
        if name in image and name in resolution.image_uses and have and have != pin:
            out.append(f"{name}: constraints.txt pins {pin}, the image's {have} is used")
    for name, extras in sorted(resolution.image_extras.items()):
        out.append(
            f"{name}[{','.join(sorted(extras))}]: from the image; its extras' needs unchecked"
        )
    unknown = sorted(n for n in resolution.image_uses if image.get(n) is None)
    if unknown:
        out.append("image versions unknown, specifiers unchecked: " + ", ".join(unknown))
    for name, why in NOT_BUNDLED.items():
        out.append(f"{name}: not bundled ({why})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("--refresh", action="store_true", help="re-pick unpinned versions")
    parser.add_argument("--out", type=Path, default=WHEEL_DIR, help="wheel folder (.whl)")
    parser.add_argument(
        "--verify-site", type=Path, default=None, metavar="SITE",
        help="on the GPU machine: check the requirements of the wheels installed in SITE",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.verify_site is not None:
        problems = verify_site(args.verify_site)
        for line in problems:
            print(f"gpu_bundle: unmet: {line}", file=sys.stderr)
        print(f"gpu_bundle: {args.verify_site}: {len(problems)} unmet requirement(s)")
        return 1 if problems else 0
    try:
        image = read_image(IMAGE_FILE.read_text())
        pins = read_pins((REPO / "constraints.txt").read_text())
        roots = project_roots(tomllib.loads((REPO / "pyproject.toml").read_text()), pins)
        args.out.mkdir(parents=True, exist_ok=True)
        fetcher = WheelFetcher(args.out, refresh=args.refresh)
        print(f"gpu_bundle: resolving against {IMAGE_FILE.relative_to(REPO)} ({len(image)} dists)")
        resolution = resolve(
            roots, image, pins, fetcher, chosen={} if args.refresh else fetcher.existing()
        )
        check_image(image, resolution.image_uses)
        keep = {name: cand.version for name, cand in resolution.chosen.items()}
        for path in stale_wheels(args.out.glob("*.whl"), keep):
            print(f"  removed {path.name} (not needed, or another version)")
            path.unlink()
        rows = report_rows(resolution)
        total = sum(r["bytes"] for r in rows)
        tree = travelling_bytes(REPO, args.out.resolve())
    except BundleError as err:
        print(f"gpu_bundle: error: {err}", file=sys.stderr)
        return 1
    print(table(rows, total, tree))
    for line in notes(resolution, image, pins):
        print(f"note: {line}")
    fits = tree + total <= TRAVEL_LIMIT_MIB * 2**20
    manifest = {
        "python": PYTHON_VERSION,
        "platforms": list(PLATFORMS),
        "image_file": str(IMAGE_FILE.relative_to(REPO)),
        "dists": rows,
        "total_bytes": total,
        "tree_bytes": tree,
        "limit_bytes": TRAVEL_LIMIT_MIB * 2**20,
        "fits": fits,
        "downloaded_this_run": fetcher.downloaded,
        "image_requirements": {n: resolution.image_uses[n] for n in sorted(resolution.image_uses)},
        "notes": notes(resolution, image, pins),
    }
    (args.out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if not fetcher.downloaded:
        print("gpu_bundle: every wheel was already there; nothing downloaded")
    if not fits:
        print(
            f"gpu_bundle: error: tree {tree / 2**20:.2f} MiB + wheels {total / 2**20:.2f} MiB "
            f"exceed {TRAVEL_LIMIT_MIB} MiB (a device call carries 64 MiB): drop a root, or "
            "leave large untracked files out of the tree (.git/info/exclude)",
            file=sys.stderr,
        )
        return 1
    print(f"gpu_bundle: {len(rows)} wheels in {args.out} (carry it: run(..., carry=['.whl']))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
