"""What the filter module is made of: bytes per part (crate), from `twiggy`
on a build that keeps its function names, next to the shipped module before
and after `wasm-opt -Oz`.

The named build is the release build with `strip = false` (the same code;
names and debug sections added), e.g.:

    CARGO_PROFILE_RELEASE_STRIP=false cargo build --release \\
        --target wasm32-wasip1 -p origin-policy-filter --target-dir target/size

Run: .venv/bin/python bench/module_size.py NAMED.wasm SHIPPED.wasm OPTIMIZED.wasm
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import subprocess
from pathlib import Path

# What each part is, for the table.
PARTS = {
    "origin_policy_engine": "the engine: policy parsing, validation, compile, index, decisions, feed",
    "origin_policy": "the filter: host calls, root, HTTP context, feed singleton",
    "core": "Rust core: formatting (`Display` of every message), slices, sorting, str",
    "serde_json": "JSON parsing (plugin configuration, policies, feed entries)",
    "proxy_wasm": "proxy-wasm SDK: dispatcher and host-call wrappers",
    "alloc": "Rust alloc: String, Vec, BTreeMap, formatting into strings",
    "hashbrown": "hash maps (domain index, caches), one copy per key/value type",
    "std": "Rust std: thread locals, panics, I/O error text",
    "proxy_on_*": "proxy-wasm ABI exports (the SDK's, gRPC callbacks included)",
    "allocator": "dlmalloc (the wasm32-wasip1 allocator)",
    "data": "data segment: messages, names, tables",
    "other": "everything else (foldhash, log, itoa, zmij, WASI imports, tables)",
}
ALLOCATOR = {"dlmalloc", "dlfree", "dispose_chunk", "realloc", "prepend_alloc", "malloc", "free",
             "tmalloc_small", "tmalloc_large", "sys_alloc", "release_unused_segments", "calloc"}  # fmt: skip
SECTIONS = re.compile(r"^(custom section|\"function names\"|type\[|table\[|elem\[|import |export |global\[|memory\[|code section|wasm magic)")


def part(name: str) -> str | None:
    """The part a twiggy item belongs to; None for what the shipped module
    does not carry (names, debug sections)."""
    if name.startswith("custom section") or name.startswith('"function names"'):
        return None
    if name.startswith("data segment") or name.startswith("data["):
        return "data"
    if name.startswith("proxy_on_") or name.startswith("proxy_abi_"):
        return "proxy_on_*"
    if name in ALLOCATOR:
        return "allocator"
    # Generic code is named after the type it is for: `<a::B as c::D>::f`
    # counts as `a`, the crate whose type it is.
    found = re.search(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[[0-9a-f]+\])?::", name)
    if found and found.group(1) in PARTS:
        return found.group(1)
    return "other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("named", type=Path)
    parser.add_argument("shipped", type=Path)
    parser.add_argument("optimized", type=Path)
    args = parser.parse_args()
    out = subprocess.run(
        ["twiggy", "top", "-n", "1000000", "-f", "csv", str(args.named)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    sizes: collections.Counter[str] = collections.Counter()
    for row in csv.DictReader(io.StringIO(out.stdout)):
        p = part(row["Name"])
        if p is not None:
            sizes[p] += int(row["ShallowSize"])
    total = sum(sizes.values())
    shipped = args.shipped.stat().st_size
    optimized = args.optimized.stat().st_size
    print(f"| part | bytes | share | what |")
    print("|---|---:|---:|---|")
    for name, size in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {size:,} | {100 * size / total:.1f}% | {PARTS[name]} |")
    print(f"| **total** (named build, names and debug sections excluded) | {total:,} | 100% | |")
    print()
    print(f"Shipped module: {shipped:,} B ({shipped / 1024:.1f} KiB); "
          f"after `wasm-opt -Oz`: {optimized:,} B ({optimized / 1024:.1f} KiB, "
          f"{100 * (1 - optimized / shipped):.0f}% less).")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
