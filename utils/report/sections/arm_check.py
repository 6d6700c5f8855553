"""The report's aarch64 section: the functional check of ``make arm-check`` (``utils.experiments.arm_check``), run
under qemu-user emulation, from its stored records. These are pass/fail results and the kernels that
ran; emulated timings are never shown."""
from __future__ import annotations

import pandas as pd

from utils.report.figures import ReportInputs

PROFILE_ORDER = ("g2", "g3", "g4")


def arm_section(records: pd.DataFrame, environments: dict) -> dict | None:
    """``records``: every environment's records (the check runs on emulated aarch64 environments, not
    the primary one)."""
    if "config.arm_profile" not in records.columns:
        return None
    rows = records[(records["notebook"] == "arm_check") & records["config.arm_profile"].notna()]
    if rows.empty:
        return None
    rows = rows.sort_values("time").drop_duplicates(["config.arm_profile", "variant"], keep="last")
    profiles = sorted(set(rows["config.arm_profile"]),
                      key=lambda p: (PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER), p))
    checks = list(dict.fromkeys(rows["variant"]))
    results = pd.DataFrame([{"check": check, **{
        profile: _verdict(rows[(rows["variant"] == check) & (rows["config.arm_profile"] == profile)])
        for profile in profiles}} for check in checks])
    machines = []
    for profile in profiles:
        group = rows[rows["config.arm_profile"] == profile]
        env = environments.get(group["environment_id"].iloc[-1], {})
        machines.append({"profile": profile, "QEMU CPU": env.get("qemu_cpu", "–"),
                         "torch": env.get("torch_build", "–"), "ISA torch detects": env.get("isa_torch", "–"),
                         "kind": " + ".join(sorted(set(group["kind"]))), "checked": group["time"].max(),
                         "passed": f"{int(group['value'].sum())}/{len(group)}"})
    details = rows.assign(profile=rows["config.arm_profile"], check_order=rows["variant"].map(checks.index),
                          profile_order=rows["config.arm_profile"].map(profiles.index))
    details = details.sort_values(["check_order", "profile_order"])[["variant", "profile", "note"]]
    return dict(results=results, machines=pd.DataFrame(machines),
                details=details.rename(columns={"variant": "check", "note": "what ran and its error"}))


def _verdict(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "–"
    return "pass" if rows["value"].iloc[-1] == 1 else "**FAIL**"


# ---- the section's interface (utils.report.render) ----------------------------------------------------

NOTEBOOKS = ("arm_check",)
FIGURES = {}


def section(inputs: ReportInputs) -> dict:
    return dict(arm=arm_section(inputs.records, inputs.environments))
