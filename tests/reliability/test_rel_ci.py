"""The CI's known-vulnerability audit (.ci/audit.py): how it judges pip-audit's report against the allow-list,
and that .ci/run runs it. (The live audit needs PyPI's JSON API or OSV; CI runs it, these tests do not.)"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import sys

import _harness as h
import pytest

spec = importlib.util.spec_from_file_location("ci_audit", h.ROOT / ".ci" / "audit.py")
audit = importlib.util.module_from_spec(spec)
sys.modules["ci_audit"] = audit  # dataclasses look their module up there
spec.loader.exec_module(audit)
TODAY = dt.date(2026, 11, 21)


def report(*vulns, skipped: int = 0, clean: int = 3) -> dict:
    deps = [{"name": f"ok{i}", "version": "1.0", "vulns": []} for i in range(clean)]
    deps += [
        {"name": f"skip{i}", "version": "1.0", "skip_reason": "Dependency not found on PyPI"} for i in range(skipped)
    ]
    deps += [
        {"name": n, "version": v, "vulns": [{"id": i, "fix_versions": ["9.9"], "aliases": a}]} for n, v, i, a in vulns
    ]
    return {"dependencies": deps, "fixes": []}


def allowance(vuln="GHSA-xxxx", pkg="requests", until=TODAY, reason="not reachable from seedlm") -> audit.Allowance:
    return audit.Allowance(vuln.upper(), pkg, until, reason)


def test_a_known_vulnerability_fails_the_build():
    code, msg = audit.judge(report(("requests", "2.0", "PYSEC-1", ["CVE-1"])), [], TODAY)
    assert code == 1 and "VULNERABLE: requests==2.0: PYSEC-1 (fixed in 9.9)" in msg and "pip-audit-allow.txt" in msg


def test_an_allowance_by_alias_passes_until_it_expires():
    found = report(("requests", "2.0", "PYSEC-1", ["GHSA-xxxx"]))
    assert audit.judge(found, [allowance()], TODAY)[0] == 0
    code, msg = audit.judge(found, [allowance(until=TODAY - dt.timedelta(days=1))], TODAY)
    assert code == 1 and "allowance expired" in msg
    assert audit.judge(found, [allowance(pkg="urllib3")], TODAY)[0] == 1  # for another package: no


def test_an_unreachable_service_is_loud_but_not_a_failure():
    code, msg = audit.judge(report(skipped=5, clean=0), [], TODAY)
    assert code == 0 and "SECURITY AUDIT NOT DONE" in msg and msg.startswith("#####")
    assert audit.judge(report(skipped=5, clean=0), [], TODAY, strict=True)[0] == 1
    code, msg = audit.judge(report(skipped=2, clean=3), [], TODAY)
    assert code == 0 and "3 of 5 pinned packages audited" in msg and "2 not audited" in msg


def test_the_allow_list_is_strict_about_its_format(tmp_path):
    f = tmp_path / "allow.txt"
    f.write_text("# comment\n\nGHSA-abcd requests 2027-01-31  # only in tests, never reached\n")
    assert audit.read_allow(f) == [
        audit.Allowance("GHSA-ABCD", "requests", dt.date(2027, 1, 31), "only in tests, never reached")
    ]
    for bad in ("GHSA-abcd requests 2027-01-31\n", "GHSA-abcd 2027-01-31 # why\n", "GHSA-abcd requests soon # why\n"):
        f.write_text(bad)
        with pytest.raises(SystemExit):
            audit.read_allow(f)
    assert audit.read_allow(h.ROOT / ".ci" / "pip-audit-allow.txt") is not None


def test_report_mode_and_ci_entry_point(tmp_path, capsys):
    (tmp_path / "r.json").write_text(json.dumps(report(("torch", "2.0", "PYSEC-9", []))))
    assert audit.main(["--report", str(tmp_path / "r.json"), "--allow", str(tmp_path / "none.txt")]) == 1
    assert "VULNERABLE: torch==2.0: PYSEC-9" in capsys.readouterr().out
    steps = [x.strip() for x in (h.ROOT / ".ci" / "run").read_text().splitlines() if not x.lstrip().startswith("#")]
    assert steps.index("make test") < steps.index(".venv/bin/python .ci/audit.py")  # tests, then the audit
    assert (audit.ROOT / "constraints.txt").is_file()
