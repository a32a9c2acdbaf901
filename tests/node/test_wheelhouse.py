"""The role's wheelhouse per target platform (files/build_wheelhouse.py), built offline from the
prepared caches: an arm64 one from this x86_64 machine holds only wheels that pip on an arm64
Debian 12 node (CPython 3.11) can install, and the same distributions as the native one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

from . import nodelab
from .test_node import snapshot_source

SCRIPT = nodelab.build_wheelhouse_script()


def supported(arch: str, python: tuple[int, int]) -> set:
    """The tags pip accepts on a Debian 12 node (glibc 2.36) of `arch` with CPython `python`."""
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 4, -1)] + \
        [f"manylinux2014_{arch}", f"linux_{arch}"] + \
        ([f"manylinux2010_{arch}", f"manylinux1_{arch}"] if arch == "x86_64" else [])
    return set(cpython_tags(python, platforms=platforms)) | \
        set(compatible_tags(python, "cp311", platforms=platforms))


def build(src: Path, out: Path, *targets: str) -> dict:
    """The script as the role runs it, offline: the caches stand in for PyPI."""
    argv = [sys.executable, str(SCRIPT), "--src", str(src), "--out", str(out)]
    argv += [f"--target={t}" for t in targets]
    argv += ["--", "--no-index", "--find-links", str(nodelab.wheels_dir()),
             "--find-links", str(nodelab.foreign_wheels_dir())]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    if not all((d / ".complete").exists()
               for d in (nodelab.wheels_dir(), nodelab.foreign_wheels_dir())):
        pytest.fail(nodelab.prepared() or "the wheel caches are not prepared")
    return snapshot_source(tmp_path_factory.mktemp("wheelhouse-src") / "src")


@pytest.fixture(scope="module")
def built(src, tmp_path_factory):
    return build(src, tmp_path_factory.mktemp("wheelhouse"), "aarch64-3.11", "x86_64-3.11")


def wheels(directory: str) -> dict[str, frozenset]:
    return {parse_wheel_filename(p.name)[0]: parse_wheel_filename(p.name)[3]
            for p in Path(directory).glob("*.whl")}


def test_arm64_wheelhouse_holds_only_wheels_for_arm64_and_python_311(built):
    arm = wheels(built["aarch64-3.11"]["path"])
    assert "oakestra-gw" in arm
    ok = supported("aarch64", (3, 11))
    bad = {name: sorted(map(str, tags)) for name, tags in arm.items() if not tags & ok}
    assert not bad, f"not installable on arm64 with CPython 3.11: {bad}"
    # The binary ones are really arm64 builds (not pure wheels only): markupsafe is C.
    assert any(t.platform.endswith("_aarch64") for t in arm["markupsafe"])
    assert not any("x86_64" in str(t) for tags in arm.values() for t in tags)
    # Nothing for another Python: every CPython-specific wheel is cp311 (or abi3).
    assert all(t.interpreter in ("py3", "cp311") or t.abi == "abi3"
               for tags in arm.values() for t in tags)


def test_same_distributions_for_every_platform_and_a_digest_each(built):
    arm, x86 = wheels(built["aarch64-3.11"]["path"]), wheels(built["x86_64-3.11"]["path"])
    assert set(arm) == set(x86)
    assert all(tags & supported("x86_64", (3, 11)) for tags in x86.values())
    assert built["aarch64-3.11"]["digest"] != built["x86_64-3.11"]["digest"]
    # The gateway's own wheel is the same pure wheel in both.
    own = [sorted(Path(built[t]["path"]).glob("oakestra_gw-*.whl"))[0].read_bytes()
           for t in ("aarch64-3.11", "x86_64-3.11")]
    assert own[0] == own[1]


def test_a_second_build_gives_the_same_digest(src, built, tmp_path):
    again = build(src, tmp_path, "aarch64-3.11")
    assert again["aarch64-3.11"]["digest"] == built["aarch64-3.11"]["digest"]
