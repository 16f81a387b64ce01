"""Markdown tables from criterion's saved estimates (target/criterion), for
BENCHMARKS.md: `decide` per case and size, and loading per size."""

import json
import sys
from pathlib import Path

CRITERION = Path(__file__).resolve().parent.parent / "target" / "criterion"
SIZES = ["1", "1000", "100000"]


def median_ns(*parts: str) -> float:
    estimates = CRITERION.joinpath(*parts, "new", "estimates.json")
    return json.loads(estimates.read_text())["median"]["point_estimate"]


def main() -> int:
    print("| case | 1 domain | 1,000 domains | 100,000 domains | 100k / 1 |")
    print("|---|---:|---:|---:|---:|")
    for case in ("exact", "wildcard", "miss"):
        ns = [median_ns("decide", case, n) for n in SIZES]
        cells = " | ".join(f"{v:.0f} ns" for v in ns)
        print(f"| `decide` {case} | {cells} | {ns[-1] / ns[0]:.2f} |")
    for step, label in (("plugin_config", "load: JSON bytes to served set"), ("compile", "compile: parsed documents to set")):
        ms = [median_ns("load", step, n) / 1e6 for n in SIZES]
        cells = " | ".join(f"{v:.3f} ms" if v < 1 else f"{v:.1f} ms" for v in ms)
        print(f"| {label} | {cells} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
