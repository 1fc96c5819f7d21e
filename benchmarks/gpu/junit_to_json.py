"""pytest's JUnit XML -> the acceptance results' JSON: each test's outcome, time and (for skips) reason.

    python benchmarks/gpu/junit_to_json.py IN.xml OUT.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def convert(source: Path) -> dict:
    tests = []
    for case in ET.parse(source).getroot().iter("testcase"):
        outcome, detail = "passed", None
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, detail = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag], found.get(
                    "message")
                break
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time", 0)), "detail": detail})
    counts = {key: sum(t["outcome"] == key for t in tests) for key in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "tests": tests}


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    if not source.is_file():
        sys.exit(f"{source} was not written (pytest did not run)")
    target.write_text(json.dumps(convert(source), indent=1) + "\n")
