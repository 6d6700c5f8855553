"""The report's aarch64 section: the functional check of ``make arm-check`` (``utils.experiments.arm_check``), run
under qemu-user emulation, from its stored records. These are pass/fail results and the kernels that
ran; emulated timings are never shown. Each profile shows its latest run only, with the commit it ran at
and what each check checked (the records' own ``checked`` text), so the section claims nothing the
records do not."""
from __future__ import annotations

import pandas as pd

from utils.report.figures import ReportInputs

PROFILE_ORDER = ("g2", "g3", "g4")


def latest_runs(records: pd.DataFrame) -> pd.DataFrame:
    """The arm_check records of each profile's latest run (an earlier run's checks, renamed or dropped
    since, are not shown as if they had run again)."""
    if "config.arm_profile" not in records.columns:
        return records.iloc[0:0]
    rows = records[(records["notebook"] == "arm_check") & records["config.arm_profile"].notna()]
    if rows.empty:
        return rows
    rows = rows.sort_values("time", kind="stable")  # stable: a run's records keep the order the checks ran in
    newest = rows.groupby("config.arm_profile")["run_id"].last()
    rows = rows[rows["run_id"] == rows["config.arm_profile"].map(newest)]
    return rows.drop_duplicates(["config.arm_profile", "variant"], keep="last")


def commit_of(group: pd.DataFrame) -> str:
    """The commit the run was made at, and whether the working tree had uncommitted changes."""
    if "git_commit" not in group.columns or group["git_commit"].isna().all():
        return "–"
    commit = str(group["git_commit"].dropna().iloc[-1])[:12]
    dirty = "git_dirty" in group.columns and bool(group["git_dirty"].fillna(False).astype(bool).any())
    return commit + (" + uncommitted changes" if dirty else "")


def arm_section(records: pd.DataFrame, environments: dict) -> dict | None:
    """``records``: every environment's records (the check runs on emulated aarch64 environments, not
    the primary one)."""
    rows = latest_runs(records)
    if rows.empty:
        return None
    profiles = sorted(set(rows["config.arm_profile"]),
                      key=lambda p: (PROFILE_ORDER.index(p) if p in PROFILE_ORDER else len(PROFILE_ORDER), p))
    checks = list(dict.fromkeys(rows["variant"]))
    checked = {}
    if "config.checked" in rows.columns:  # what each check checked, as the run recorded it
        checked = rows.dropna(subset=["config.checked"]).groupby("variant")["config.checked"].last().to_dict()
    results = pd.DataFrame([{"check": check, **{
        profile: _verdict(rows[(rows["variant"] == check) & (rows["config.arm_profile"] == profile)])
        for profile in profiles}, **({"what it checked": checked.get(check, "–")} if checked else {})}
        for check in checks])
    machines = []
    for profile in profiles:
        group = rows[rows["config.arm_profile"] == profile]
        env = environments.get(group["environment_id"].iloc[-1], {})
        torchao = (env.get("libraries") or {}).get("torchao")
        machines.append({"profile": profile, "QEMU CPU": env.get("qemu_cpu", "–"),
                         "torch": env.get("torch_build", "–") + (f", torchao {torchao}" if torchao else ""),
                         "ISA torch detects": env.get("isa_torch", "–"),
                         "kind": " + ".join(sorted(set(group["kind"]))), "checked": group["time"].max(),
                         "commit": commit_of(group), "passed": f"{int(group['value'].sum())}/{len(group)}"})
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
