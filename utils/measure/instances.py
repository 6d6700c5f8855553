"""AWS Graviton instance sizes (vCPUs and memory per family) and the usable-memory rule that says which
instance a measured peak fits: a stated assumption, used by notebooks 04 and 06 and the report."""
from __future__ import annotations

import pandas as pd

from utils.io import GIB

# ---- Graviton instance sizes ------------------------------------------------------------------------------
# vCPUs per size and GiB of memory per vCPU by family (AWS's instance type pages: c7g/c8g "compute optimised"
# 2 GiB per vCPU, m7g/m8g 4, r7g/r8g 8); sizes .medium to .16xlarge
INSTANCE_VCPUS = {"medium": 1, "large": 2, "xlarge": 4, "2xlarge": 8, "4xlarge": 16, "8xlarge": 32, "12xlarge": 48,
                  "16xlarge": 64}

GIB_PER_VCPU = {"c7g": 2, "m7g": 4, "r7g": 8, "c8g": 2, "m8g": 4, "r8g": 8}

# Headroom for the OS, an assumption: the kernel and firmware keep 3-5 % of the nominal memory out of
# MemTotal, and the OS with its daemons and the page cache of the libraries needs about half a GiB.
HEADROOM_FRACTION = 0.06

HEADROOM_FIXED_GIB = 0.5

HEADROOM_RULE = (f"usable = nominal x (1 - {HEADROOM_FRACTION:.0%}) - {HEADROOM_FIXED_GIB} GiB "
                 "(kernel/firmware reservation and the OS; an assumption, not measured)")


def instance_table(families=("c7g", "m7g", "r7g")) -> pd.DataFrame:
    """instance, family, vcpus, memory_gib (nominal) and usable_gib (after the OS headroom), smallest first."""
    unknown = set(families) - set(GIB_PER_VCPU)
    if unknown:
        raise ValueError(f"unknown instance families {sorted(unknown)}; accepted: {', '.join(GIB_PER_VCPU)}")
    rows = [dict(instance=f"{family}.{size}", family=family, vcpus=vcpus, memory_gib=vcpus * GIB_PER_VCPU[family],
                 usable_gib=vcpus * GIB_PER_VCPU[family] * (1 - HEADROOM_FRACTION) - HEADROOM_FIXED_GIB)
            for family in families for size, vcpus in INSTANCE_VCPUS.items()]
    return pd.DataFrame(rows).sort_values(["family", "memory_gib"], kind="stable").reset_index(drop=True)


def smallest_instance(peak_bytes: float, family: str) -> dict | None:
    """The smallest ``family`` instance whose usable memory holds ``peak_bytes``, or None."""
    table = instance_table((family,))
    fits = table[table["usable_gib"] * GIB >= peak_bytes]
    return None if fits.empty else fits.iloc[0].to_dict()
