"""Print the mutation score per module from mutmut's result files (mutants/**/*.py.meta).

A mutant is killed when its tests failed (exit code != 0 and != the "not checked" marks), survived
when they passed (0), and not counted when it was never run (null) or had no test reaching it
(mutmut's 33: "no tests"), which is listed separately: those need a test before they can count.
Usage: python scripts/mutation_score.py [-v] [module-prefix ...]   (-v: list the survivors)
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

NO_TESTS = 33  # mutmut: no test covers the mutated function
TIMEOUT = (36, 24, -24, 152)  # mutmut: the tests timed out (counted as killed, as mutmut does)


def main(args: list[str]) -> int:
    argv = [a for a in args if not a.startswith("-")]
    show = "-v" in args or "--survivors" in args
    root = Path(__file__).resolve().parent.parent / "mutants"
    rows: dict[str, Counter[str]] = {}
    survivors: list[str] = []
    for meta in sorted(root.rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data.get("exit_code_by_key", {}).items():
            module = name.split(".x_")[0].split(".xǁ")[0]
            if argv and not any(module.startswith(p) for p in argv):
                continue
            c = rows.setdefault(module, Counter())
            if code is None:
                c["not run"] += 1
            elif code == 0:
                c["survived"] += 1
                survivors.append(name)
            elif code == NO_TESTS:
                c["no tests"] += 1
            else:
                c["killed"] += 1
    total = Counter[str]()
    print(f"{'module':28} {'killed':>7} {'survived':>8} {'no tests':>8} {'not run':>7} {'score':>6}")
    for module, c in sorted(rows.items()):
        if not (c["killed"] or c["survived"]):
            continue
        total.update(c)
        score = c["killed"] / (c["killed"] + c["survived"])
        print(f"{module:28} {c['killed']:7} {c['survived']:8} {c['no tests']:8} {c['not run']:7} {score:6.1%}")
    if total["killed"] + total["survived"]:
        score = total["killed"] / (total["killed"] + total["survived"])
        print(f"{'all':28} {total['killed']:7} {total['survived']:8} {total['no tests']:8} {total['not run']:7} {score:6.1%}")
    if show:
        print("\n".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
