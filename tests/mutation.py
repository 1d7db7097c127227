"""Mutation score of the policy and token code: mutmut 3, then a table per module.

    .venv/bin/python tests/mutation.py                 run every module, then report
    .venv/bin/python tests/mutation.py router tokens   only these modules
    .venv/bin/python tests/mutation.py --survivors     run again only what survived last time
    .venv/bin/python tests/mutation.py --report        report the last results, run nothing
    .venv/bin/python tests/mutation.py --sample 60     a seeded sample of 60 mutants per module

mutmut is configured in pyproject.toml ([tool.mutmut]: the four modules, the test files)
and keeps its results in mutants/, so a second run only tests what changed. A survivor
listed in mutation-equivalents.md (an equivalent mutant, or one not worth a test, each
with its reason) is shown with that reason; the score counts it as survived all the same.
Exit status: 0, or 1 when a module scores under --min (default 0: report only).

Loaded by mutmut as a pytest plugin too (``-p tests.mutation``, pyproject.toml): it orders
a mutant's tests fastest first, by the durations mutmut recorded.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODULES = {
    "headers": "proxy.policy.headers",
    "guard": "proxy.policy.guard",
    "router": "proxy.policy.router",
    "tokens": "proxy.auth.tokens",
}
#: mutmut's verdicts that mean a test noticed the change.
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}
EQUIVALENTS = ROOT / "mutation-equivalents.md"


def pytest_collection_modifyitems(items: list[Any]) -> None:
    """Fastest tests first, when mutmut has timed them (a no-op anywhere else)."""
    stats = Path(__file__).resolve().parent.parent / "mutmut-stats.json"
    if Path(__file__).resolve().parent.parent.name != "mutants" or not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def mutmut(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], cwd=ROOT, text=True, capture_output=True)


def results() -> dict[str, str]:
    """mutant name -> verdict, for every mutant mutmut has generated."""
    out = mutmut("results", "--all", "true")
    if out.returncode != 0:
        sys.exit(f"mutmut results failed:\n{out.stderr}")
    verdicts = {}
    for line in out.stdout.splitlines():
        name, sep, verdict = line.strip().rpartition(": ")
        if sep and "__mutmut_" in name:
            verdicts[name] = verdict
    return verdicts


def equivalents() -> dict[str, str]:
    """Mutant name -> reason, from lines "- `NAME`: reason" in mutation-equivalents.md."""
    if not EQUIVALENTS.exists():
        return {}
    found = {}
    for m in re.finditer(r"^- `([^`]+__mutmut_\d+)`: (.+)$", EQUIVALENTS.read_text(), re.M):
        found[m.group(1)] = m.group(2)
    return found


def module_of(name: str) -> str | None:
    for short, dotted in MODULES.items():
        if name.startswith(dotted + "."):
            return short
    return None


def sample(modules: list[str], n: int, seed: int) -> list[str]:
    """``n`` mutants of each module, the same ones for the same source and seed."""
    if not Path(ROOT / "mutants").exists():
        # mutmut generates the mutants on its first run; generate them without testing any.
        mutmut("run", "proxy.policy.router.x_compile_route__mutmut_1")
    names = sorted(results(), key=_natural)
    picked = []
    for short in modules:
        mine = [n_ for n_ in names if module_of(n_) == short]
        picked += random.Random(f"{seed}:{short}").sample(mine, min(n, len(mine)))
    return picked


def report(modules: list[str], min_score: float, only: set[str] | None = None) -> int:
    verdicts = results()
    if only is not None:
        verdicts = {n: v for n, v in verdicts.items() if n in only}
    known = equivalents()
    status = 0
    rows = []
    survivors: list[str] = []
    for short in modules:
        mine = {n: v for n, v in verdicts.items() if module_of(n) == short}
        total = len(mine)
        killed = sum(v in DETECTED for v in mine.values())
        unchecked = sum(v == "not checked" for v in mine.values())
        alive = sorted((n for n, v in mine.items() if v not in DETECTED and v != "not checked"), key=_natural)
        equiv = sum(n in known for n in alive)
        score = 100.0 * killed / total if total else 0.0
        rows.append((short, killed, total, score, equiv, unchecked))
        survivors += alive
        if score < min_score:
            status = 1
    print()
    print("| module | killed / total | score | survivors listed in mutation-equivalents.md | not yet run |")
    print("|---|---|---|---|---|")
    for short, killed, total, score, equiv, unchecked in rows:
        print(f"| {short} | {killed} / {total} | {score:.0f}% | {equiv} | {unchecked} |")
    print()
    print(f"survivors ({len(survivors)}; `mutmut show NAME` prints the change):")
    for name in survivors:
        note = f"  [listed: {known[name]}]" if name in known else ""
        print(f"  {name}: {verdicts[name]}{note}")
    return status


def _natural(name: str) -> tuple[str, int]:
    base, _, n = name.rpartition("__mutmut_")
    return base, int(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", choices=[[], *MODULES], help="default: all four")
    parser.add_argument("--report", action="store_true", help="print the last results; run nothing")
    parser.add_argument("--survivors", action="store_true", help="run again only the mutants that survived")
    parser.add_argument("--min", type=float, default=0.0, help="exit 1 when a module scores under this percentage")
    parser.add_argument("--sample", type=int, default=0, help="run a seeded sample of this many mutants per module")
    parser.add_argument("--seed", type=int, default=17, help="the sample's seed (default 17)")
    # One at a time: the fakes serve on a port reserved when tests/fakes is imported, which
    # every worker mutmut forks inherits, so two workers would answer each other's requests.
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1; see above)")
    args = parser.parse_args()
    modules = args.modules or list(MODULES)
    only = set(sample(modules, args.sample, args.seed)) if args.sample else None
    if not args.report:
        if args.survivors:
            names = [
                n
                for n, v in results().items()
                if module_of(n) in modules and v not in DETECTED and v != "not checked" and (only is None or n in only)
            ]
            if not names:
                print("no survivors to run again")
                return report(modules, args.min, only)
        elif only is not None:
            names = sorted(only)
        else:
            names = [f"{MODULES[m]}.*" for m in modules] if args.modules else []
        exe = Path(sys.executable).with_name("mutmut")
        run = subprocess.run([str(exe), "run", "--max-children", str(args.max_children), *names], cwd=ROOT)
        if run.returncode not in (0, 1):
            print(f"mutmut run exited {run.returncode}", file=sys.stderr)
            return run.returncode
    return report(modules, args.min, only)

if __name__ == "__main__":
    sys.exit(main())
