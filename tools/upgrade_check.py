"""`make upgrade-check`: what a user who installs today would get, and whether it works.

Builds a throw-away venv (removed afterwards), installs the pinned torch and
then this package the way a user does (`pip install .[test,report]`: the
newest releases pyproject's ranges admit), lists every package whose version
differs from requirements.lock, runs the test suite against that install and
prints which tests broke and the first line of each error. Changes nothing in
the project; exits 1 when the suite fails, so drift is seen before users see it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"


def locked_versions(lock: Path) -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", lock.read_text(), flags=re.M)
    return {normalise(n): v for n, v in pins}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the venv (its path is printed)")
    ap.add_argument("pytest_args", nargs="*", default=[str(ROOT / "tests")], help="what pytest runs (default: the suite)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="multiconcept-upgrade-"))
    venv = work / "venv"
    py = venv / "bin" / "python"
    try:
        run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run([*pip, TORCH], check=True)
        install = run([*pip, f"{ROOT}[test,report]"], capture_output=True)
        if install.returncode != 0:
            print("\nUPGRADE CHECK: the newest releases pyproject admits do not install together:")
            print((install.stderr or install.stdout).strip()[-3000:])
            return 1
        freeze = run([str(py), "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, check=True).stdout
        now = {normalise(n): v for n, v in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", freeze, flags=re.M)}
        locked = locked_versions(ROOT / "requirements.lock")
        moved = sorted((n, locked.get(n, "-"), v) for n, v in now.items()
                       if n not in ("multiconcept", "torch") and locked.get(n) != v)
        report = work / "junit.xml"
        tests = run([str(py), "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={report}", *args.pytest_args],
                    cwd=work, capture_output=True, env=test_env())
        broke = failures(report) if report.exists() else []
        print("\nUPGRADE CHECK")
        print(f"packages that moved from requirements.lock ({len(moved)}):")
        for name, old, new in moved:
            print(f"  {name:28s} {old:>14s} -> {new}")
        print(f"test suite against them: {totals(report) if report.exists() else '(pytest wrote no report)'}")
        for test, line in broke:
            print(f"  BROKE {test}: {line}")
        if tests.returncode not in (0, 5) and not broke:
            print((tests.stdout + tests.stderr)[-3000:])
        return 0 if tests.returncode == 0 else 1
    finally:
        if args.keep:
            print(f"venv kept at {venv}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def test_env() -> dict:
    import os

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = ""  # the installed package, not this tree's src/
    return env


def totals(junit: Path) -> str:
    import xml.etree.ElementTree as ET

    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return (f"{passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
            f"in {float(suite.get('time', 0)):.0f} s")


def failures(junit: Path) -> list[tuple[str, str]]:
    import xml.etree.ElementTree as ET

    out = []
    for case in ET.parse(junit).iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            first = (bad.get("message") or bad.text or "").strip().splitlines()
            out.append((f"{case.get('classname')}::{case.get('name')}", first[0][:200] if first else ""))
    return out


if __name__ == "__main__":
    sys.exit(main())
