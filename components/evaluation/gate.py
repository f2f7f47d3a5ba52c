"""The champion/challenger gate: promotion rules of params.yaml (`register.gate`) applied with CIs.

Minimums compare point estimates. A regression against the champion counts only when it is
significant and larger than allowed: with evaluate's paired comparison (both models on the same
items), the bootstrap CI of challenger - champion must lie below 0; without it (the champion changed
since evaluate ran), the champion's recorded value must lie above the challenger's CI; without any
CI (bootstrap: 0), every drop counts. Pure functions; no MLflow.
"""

from __future__ import annotations

from typing import Any

from components.core.config import GateConfig


def _significance(
    m: str, drop: float, challenger: dict[str, Any], base: float, paired: dict[str, Any] | None
) -> dict[str, Any]:
    """Is the drop of `m` significant? Paired CI when evaluate compared both; else the challenger's CI."""
    p = (paired or {}).get(m) or {}
    if p.get("ci"):
        lo, hi = p["ci"]  # CI of challenger - champion on the same items
        return {"method": "paired bootstrap", "drop_ci": [-hi, -lo], "significant": hi < 0}
    ci = challenger.get(f"{m}_ci")
    if ci:
        return {
            "method": "unpaired: champion's value vs the challenger's CI",
            "challenger_ci": ci,
            "significant": base > ci[1],
        }
    return {"method": "no CI: every drop counts", "significant": drop > 0}


def evaluate_gate(
    gate: GateConfig,
    challenger: dict[str, Any],
    champion: dict[str, float] | None,
    champion_version: str | None = None,
    paired: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply the promotion rules (higher is better for every gate metric). Pure; no MLflow.

    `paired`: evaluate's comparison of this challenger with this champion on the same items
    ({metric: {"diff", "ci", "significant"}}); without it the challenger's own CIs are used.
    """
    rules: list[dict[str, Any]] = []
    for m, lo in sorted(gate.min.items()):
        value = challenger[m]
        rules.append(
            {
                "rule": "min",
                "metric": m,
                "value": value,
                "threshold": lo,
                "passed": value >= lo,
                "detail": f"{m} = {value:.4f} {'>=' if value >= lo else '<'} minimum {lo:.4f}",
            }
        )
    for m in sorted({gate.metric, *gate.max_regression}):
        allowed = gate.max_regression.get(m, 0.0)
        value = challenger[m]
        base = None if champion is None else champion.get(m)
        rule = {
            "rule": "max_regression",
            "metric": m,
            "value": value,
            "champion": base,
            "champion_version": champion_version,
            "allowed_drop": allowed,
        }
        if champion is None:
            rule.update(passed=True, detail=f"no champion yet; {m} not compared")
        elif base is None:
            rule.update(passed=True, detail=f"champion v{champion_version} has no metric.{m}; not compared")
        else:
            drop = base - value
            sig = _significance(m, drop, challenger, base, paired)
            worse = sig["significant"] and drop > allowed + 1e-12
            ci = sig.get("drop_ci")
            rule.update(
                drop=drop,
                **sig,
                passed=not worse,
                detail=(
                    f"{m} = {value:.4f} vs champion v{champion_version} {base:.4f}: drop {drop:+.4f}"
                    + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
                    + f", {'significant' if sig['significant'] else 'not significant'} ({sig['method']}), "
                    + f"allowed {allowed:.4f}: {'worse' if worse else 'not worse'}"
                ),
            )
        rules.append(rule)
    passed = all(r["passed"] for r in rules)
    reasons = [r["detail"] for r in rules if not r["passed"]] or ["all rules passed"]
    return {
        "decision": "promoted" if passed else "rejected",
        "passed": passed,
        "metric": gate.metric,
        "rules": rules,
        "reasons": reasons,
        "champion_version": champion_version,
        "paired": paired is not None,
        "config": gate.model_dump(mode="json"),
    }


def gate_markdown(name: str, version: str, gate: dict[str, Any], challenger: dict[str, Any]) -> str:
    lines = [
        f"# Gate report: {name} v{version}",
        "",
        f"**Decision: {gate['decision']}**"
        + (f" (champion stays v{gate['champion_version']})" if not gate["passed"] and gate["champion_version"] else ""),
        "",
        "| rule | metric | challenger | threshold / champion | drop [CI] | significant | passed | detail |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in gate["rules"]:
        ref = r.get("threshold", r.get("champion"))
        ci = r.get("drop_ci")
        drop = "-" if "drop" not in r else f"{r['drop']:+.4f}" + (f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        sig = {True: "yes", False: "no"}.get(r.get("significant"), "-")
        lines.append(
            f"| {r['rule']} | {r['metric']} | {r['value']:.4f} | {'-' if ref is None else f'{ref:.4f}'} | "
            f"{drop} | {sig} | {'yes' if r['passed'] else 'NO'} | {r['detail']} |"
        )
    ci = challenger.get(f"{gate['metric']}_ci")
    if ci:
        lines += ["", f"{gate['metric']} confidence interval: [{ci[0]:.4f}, {ci[1]:.4f}]"]
    return "\n".join(lines) + "\n"
