#!/usr/bin/env python3
"""Replace each sync_data()/sync_dir() call of the queue, one at a time, by a no-op, and report
whether the power-cut model's crash tests notice (docs/QUEUE-AND-SYNC.md, "Which syncs the model
proves"). Works on a copy of the workspace; the checkout is never edited.

usage: scripts/fsync-mutations.py [--cases N]    (default 1500 cases a call)
"""
import argparse
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["lib.rs", "state.rs", "gaps.rs"]
CALL = re.compile(r"\.sync_data\(\)|\.sync_dir\(([^()]*(?:\([^()]*\))?[^()]*)\)")
FUNCTION = re.compile(r"\bfn ([a-z_0-9]+)\(")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1500)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="fsync-mutations-")
    try:
        for item in ["Cargo.toml", "Cargo.lock", "crates", "tests"]:
            src = os.path.join(ROOT, item)
            dst = os.path.join(work, item)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
        src_dir = os.path.join(work, "crates", "queue", "src")
        env = dict(os.environ, DERMEDGE_CRASH_CASES=str(args.cases), RUST_BACKTRACE="0",
                   CARGO_TARGET_DIR=os.path.join(ROOT, "target", "fsync-mutations"))
        for name in FILES:
            path = os.path.join(src_dir, name)
            original = open(path).read()
            for m in list(CALL.finditer(original)):
                line = original.count("\n", 0, m.start()) + 1
                functions = FUNCTION.findall(original[: m.start()])
                where = f"{name}:{line} in {functions[-1] if functions else '?'}"
                if m.group(0) == ".sync_data()":
                    replacement = ".size().map(|_| ())"
                else:
                    replacement = ".exists(" + m.group(1) + ").map(|_| ())"
                open(path, "w").write(original[: m.start()] + replacement + original[m.end():])
                try:
                    run = subprocess.run(
                        ["cargo", "test", "-q", "-p", "dermedge-queue", "--lib", "crash_tests"],
                        cwd=work, env=env, capture_output=True, text=True)
                finally:
                    open(path, "w").write(original)
                out = run.stdout + run.stderr
                if "error[" in out:
                    verdict = "does not compile"
                elif run.returncode != 0:
                    verdict = "CAUGHT"
                else:
                    verdict = "missed"
                why = next((l.strip() for l in out.splitlines() if "Test failed" in l), "")
                print(f"{verdict:8} {where:40} {m.group(0):28} {why[:150]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
