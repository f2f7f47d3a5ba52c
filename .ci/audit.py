"""Known-vulnerability audit of the locked dependency set (constraints.txt) with pip-audit.

    python .ci/audit.py                       # what .ci/run does after the tests

Fails (exit 1) on any known vulnerability of a pinned package that `.ci/pip-audit-allow.txt` does not
allow (an allowance names the vulnerability id, the package, an expiry date and a reason). pip-audit
needs its vulnerability service (PyPI's JSON API, or OSV): where that cannot be reached, or answers for
none of the packages, the audit is reported as NOT DONE in a loud banner and does not fail the build
(set SEEDLM_AUDIT_STRICT=1 to fail instead). Nothing here can hang: every step has a timeout.
pip-audit runs from its own virtualenv under .seedlm/ so it never changes the locked set it audits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIP_AUDIT = "pip-audit==2.10.1"
VENV = ROOT / ".seedlm" / "audit-venv"
UNREACHABLE = re.compile(
    r"NameResolutionError|ConnectionError|Max retries exceeded|Temporary failure in name "
    r"resolution|timed out|ConnectTimeout|ReadTimeout|Network is unreachable",
    re.I,
)


@dataclass(frozen=True)
class Allowance:
    vuln: str
    package: str
    until: dt.date
    reason: str


def read_allow(path: Path) -> list[Allowance]:
    """`<VULN-ID> <package> <until YYYY-MM-DD> # <reason>` per line; blank lines and # comments ignored."""
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if path.is_file() else ():
        body, _, reason = line.partition("#")
        if not body.strip():
            continue
        parts = body.split()
        if len(parts) != 3 or not reason.strip():
            raise SystemExit(f"{path}:{n}: expected `<VULN-ID> <package> <YYYY-MM-DD> # <reason>`, got {line!r}")
        try:
            until = dt.date.fromisoformat(parts[2])
        except ValueError:
            raise SystemExit(f"{path}:{n}: {parts[2]!r} is not a date (YYYY-MM-DD)") from None
        out.append(Allowance(parts[0].upper(), parts[1].lower(), until, reason.strip()))
    return out


def banner(lines: list[str]) -> str:
    width = max(len(x) for x in lines) + 4
    return "\n".join(["#" * width, *(f"# {x.ljust(width - 4)} #" for x in lines), "#" * width])


def judge(report: dict, allow: list[Allowance], today: dt.date, strict: bool = False) -> tuple[int, str]:
    """(exit code, message) for a pip-audit JSON report."""
    deps = report.get("dependencies") or []
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    if not audited:
        msg = banner(
            [
                "SECURITY AUDIT NOT DONE: the vulnerability service answered for none of the "
                f"{len(deps)} pinned packages",
                "(offline, or a registry mirror without PyPI's JSON API).",
                "Run `python .ci/audit.py` where pypi.org or api.osv.dev is reachable.",
            ]
        )
        return (1 if strict else 0), msg
    bad, allowed, expired = [], [], []
    for d in audited:
        for v in d.get("vulns") or []:
            ids = {v["id"].upper(), *(a.upper() for a in v.get("aliases") or [])}
            match = [a for a in allow if a.vuln in ids and a.package == d["name"].lower()]
            line = f"{d['name']}=={d['version']}: {v['id']} (fixed in {', '.join(v.get('fix_versions') or []) or '?'})"
            if any(a.until >= today for a in match):
                allowed.append(line)
            elif match:
                expired.append(line + f" — allowance expired {max(a.until for a in match)}")
            else:
                bad.append(line)
    lines = [f"pip-audit: {len(audited)} of {len(deps)} pinned packages audited"]
    if skipped:
        lines.append(
            f"  {len(skipped)} not audited (no answer from the service): "
            + ", ".join(d["name"] for d in skipped[:15])
            + (" ..." if len(skipped) > 15 else "")
        )
    lines += [f"  allowed: {x}" for x in allowed]
    lines += [f"  VULNERABLE: {x}" for x in bad + expired]
    if bad or expired:
        lines.append(
            "Upgrade the package in constraints.txt (and pyproject.toml), or add a dated allowance with "
            "its reason to .ci/pip-audit-allow.txt."
        )
        return 1, "\n".join(lines)
    lines.append("  no known vulnerabilities" + (" (others allowed above)" if allowed else ""))
    return 0, "\n".join(lines)


def pip_audit_bin(timeout: float) -> Path | None:
    exe = VENV / "bin" / "pip-audit"
    if exe.is_file():
        return exe
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=timeout, capture_output=True)
        subprocess.run(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", PIP_AUDIT],
            check=True,
            timeout=timeout,
            capture_output=True,
        )
    except (subprocess.SubprocessError, OSError) as e:
        print(f"pip-audit: cannot install {PIP_AUDIT} ({type(e).__name__}: {str(e)[:300]})", file=sys.stderr)
        return None
    return exe if exe.is_file() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requirements", type=Path, default=ROOT / "constraints.txt")
    ap.add_argument("--allow", type=Path, default=ROOT / ".ci" / "pip-audit-allow.txt")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for the install and for the audit each")
    ap.add_argument("--report", type=Path, help="judge this pip-audit JSON report instead of running pip-audit")
    args = ap.parse_args(argv)
    strict = os.environ.get("SEEDLM_AUDIT_STRICT") == "1"
    allow = read_allow(args.allow)
    if args.report:
        code, msg = judge(json.loads(args.report.read_text()), allow, dt.date.today(), strict)
        print(msg)
        return code
    exe = pip_audit_bin(args.timeout)
    if exe is None:
        print(banner(["SECURITY AUDIT NOT DONE: pip-audit could not be installed (registry unreachable?)."]))
        return 1 if strict else 0
    cmd = [
        str(exe),
        "-r",
        str(args.requirements),
        "--no-deps",
        "--disable-pip",
        "--format",
        "json",
        "--progress-spinner",
        "off",
        "--timeout",
        "15",
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(
            banner([f"SECURITY AUDIT NOT DONE: pip-audit took more than {args.timeout:.0f} s (service unreachable?)."])
        )
        return 1 if strict else 0
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        if UNREACHABLE.search(res.stderr):
            print(
                banner(
                    [
                        "SECURITY AUDIT NOT DONE: the vulnerability service is unreachable:",
                        UNREACHABLE.search(res.stderr).group(0),
                    ]
                )
            )
            return 1 if strict else 0
        print(f"pip-audit failed (exit {res.returncode}):\n{res.stderr[-3000:]}", file=sys.stderr)
        return 1
    code, msg = judge(report, allow, dt.date.today(), strict)
    print(msg)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
