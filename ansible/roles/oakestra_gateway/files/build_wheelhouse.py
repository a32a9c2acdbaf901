#!/usr/bin/env python3
"""Build the gateway's wheelhouse on the controller, one per target node platform.

    build_wheelhouse.py --src CHECKOUT --out DIR --target aarch64-3.11 [--target x86_64-3.11]
                        [-- PIP ARGS...]
    build_wheelhouse.py --prebuilt DIR --target x86_64-3.11

Our own wheel is pure Python, so it is built once (reproducibly: SOURCE_DATE_EPOCH) with the
controller's Python. The dependencies are downloaded as binary wheels for each target's
architecture and Python (`pip download --platform ... --python-version ... --only-binary`),
never compiled on the controller, so an x86_64 controller provisions arm64 nodes. Prints JSON:
{target: {"path": DIR, "digest": sha256 prefix over the wheels}}; an unchanged checkout and
index give the same digest, so a node that has it installs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# The newest glibc of the supported node OS (Debian 12 bookworm: 2.36) and the oldest
# manylinux level any wheel uses (manylinux_2_17 is manylinux2014).
GLIBC_MINOR, OLDEST_MINOR = 36, 5


def platforms(arch: str) -> list[str]:
    """The platform tags a Debian 12 node of `arch` (uname -m) installs, most specific first."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, OLDEST_MINOR - 1, -1)]
    legacy = {"x86_64": ["manylinux2014", "manylinux2010", "manylinux1"],
              "i686": ["manylinux2014", "manylinux2010", "manylinux1"]}.get(
        arch, ["manylinux2014"])
    return tags + [f"{name}_{arch}" for name in legacy] + [f"linux_{arch}"]


def parse_target(text: str) -> tuple[str, str]:
    arch, sep, version = text.partition("-")
    major, _, minor = version.partition(".")
    if not sep or not arch or not major.isdigit() or not minor.isdigit():
        raise SystemExit(f"target {text!r} is not ARCH-MAJOR.MINOR (e.g. aarch64-3.11)")
    return arch, version


def digest(directory: Path) -> str:
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                    for p in sorted(directory.glob("*.whl")))
    if not lines:
        raise SystemExit(f"{directory}: no wheels")
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "--quiet",
                    "--disable-pip-version-check"], check=True, env=env)


def build(src: Path, out: Path, targets: list[str], pip_args: list[str]) -> dict:
    own = out / "_own"
    shutil.rmtree(own, ignore_errors=True)
    env = dict(os.environ, SOURCE_DATE_EPOCH="315532800")
    pip("wheel", "--no-deps", "--wheel-dir", str(own), *pip_args, str(src), env=env)
    (wheel,) = own.glob("*.whl")
    result = {}
    for target in targets:
        arch, version = parse_target(target)
        dest = out / target
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        major, minor = version.split(".")
        platform_args = [a for tag in platforms(arch) for a in ("--platform", tag)]
        # Resolving from our wheel (not the source tree) keeps pip from building anything
        # for a platform it is not running on.
        pip("download", "--only-binary=:all:", *platform_args, "--python-version", version,
            "--implementation", "cp", "--abi", f"cp{major}{minor}", "--abi", "abi3",
            "--abi", "none", "--dest", str(dest), *pip_args, str(wheel))
        result[target] = {"path": str(dest), "digest": digest(dest)}
    shutil.rmtree(own)
    return result


def main(argv: list[str]) -> int:
    own_args, _, pip_args = (argv[:argv.index("--")], None, argv[argv.index("--") + 1:]) \
        if "--" in argv else (argv, None, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--prebuilt", type=Path, help="a directory of wheels to use as is")
    parser.add_argument("--target", action="append", required=True,
                        help="ARCH-MAJOR.MINOR of a node, e.g. aarch64-3.11 (repeatable)")
    args = parser.parse_args(own_args)
    targets = sorted(set(args.target))
    if args.prebuilt:
        result = {t: {"path": str(args.prebuilt), "digest": digest(args.prebuilt)}
                  for t in targets}
    elif args.src and args.out:
        result = build(args.src, args.out, targets, pip_args)
    else:
        parser.error("give --src and --out, or --prebuilt")
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
