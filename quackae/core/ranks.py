"""Which process of a distributed job this is, in one rule: its global rank and the launcher's job id.

Before a ``Trainer`` exists the rank comes from the launcher's environment: torchrun and Lightning set
``RANK``, SLURM ``SLURM_PROCID``, MPI ``PMI_RANK`` or ``OMPI_COMM_WORLD_RANK``, LSF ``JSM_NAMESPACE_RANK``,
and the processes Lightning launches on one node ``LOCAL_RANK``. Once Lightning is loaded and has set up its
strategy, its own record of the rank (which the environment may not carry) wins when it is not zero.
"""

from __future__ import annotations

import hashlib
import os
import sys

RANK_VARIABLES = ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "JSM_NAMESPACE_RANK", "LOCAL_RANK")
JOB_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")


def global_rank() -> int:
    """This process's global rank (0 outside a distributed job), without importing Lightning."""
    rank_zero = sys.modules.get("lightning_fabric.utilities.rank_zero")
    lightning = int(getattr(getattr(rank_zero, "rank_zero_only", None), "rank", 0) or 0)
    if lightning:
        return lightning
    for name in RANK_VARIABLES:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def launcher_job(kind: str) -> str | None:
    """A job id every rank of one torchrun or SLURM launch derives alike for a ``kind`` of job ("train",
    "encode"), None outside such a launch."""
    for name in JOB_VARIABLES:
        value = os.environ.get(name)
        if value and value != "none":
            step = os.environ.get("SLURM_STEP_ID", "")
            return hashlib.blake2b(f"{kind}:{name}:{value}:{step}".encode(), digest_size=6).hexdigest()
    return None
