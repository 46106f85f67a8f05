"""The Python half of launch/gpu_wheels.sh: which resolved packages to download, and whether the
folder then holds them, once each.

    python launch/gpu_wheels.py select REPORT HAVE_FILE WANTED_FILE   (HAVE_FILE may be '')
    python launch/gpu_wheels.py verify FOLDER WANTED_FILE
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# torch and its CUDA stack are the target's own
TARGETS_OWN = ("torch", "triton")
TARGETS_OWN_PREFIXES = ("nvidia-", "cuda-")
BUILT_HERE = {"deepspeed"}  # already in the folder, built from source by gpu_wheels.sh


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_have(have_file: str) -> set:
    """Names from `pip list --format=freeze` output (or names alone)."""
    have = set()
    if have_file:
        for line in open(have_file):
            line = line.strip()
            if line and not line.startswith("#"):
                have.add(norm(re.split(r"[=<>!~ @;\[]", line, maxsplit=1)[0]))
    return have


def select(report: str, have_file: str, wanted_file: str) -> int:
    have = read_have(have_file)
    wanted, left_out = [], []
    for item in json.load(open(report))["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        n = norm(name)
        if n in TARGETS_OWN or n.startswith(TARGETS_OWN_PREFIXES) or n in have:
            left_out.append(f"{name}=={version}")
        elif n not in BUILT_HERE:
            wanted.append(f"{name}=={version}")
    Path(wanted_file).write_text("".join(w + "\n" for w in wanted))
    print(f"[gpu_wheels] {len(wanted)} to download; left out (the target's own): {', '.join(sorted(left_out)) or 'none'}")
    return 0


def verify(folder: str, wanted_file: str) -> int:
    versions = defaultdict(list)
    for wheel in sorted(Path(folder).glob("*.whl")):
        versions[norm(wheel.name.split("-")[0])].append(wheel.name)
    missing = [spec for spec in Path(wanted_file).read_text().split() if norm(spec.split("==")[0]) not in versions]
    if missing:
        print(f"gpu_wheels: not downloaded (pip's output above): {', '.join(missing)}", file=sys.stderr)
        return 1
    # a folder used before may hold another version of a package: pip installs both and fails there
    twice = [", ".join(names) for names in versions.values() if len(names) > 1]
    if twice:
        print(f"gpu_wheels: {folder} holds two versions of a package ({'; '.join(twice)}); remove the older",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"select": select, "verify": verify}[command](*args))
