"""The stages: one thin module per command and the one table the command line and pipelines read.

Owns: the table of commands (``table``), each command's frozen config dataclass (``configs``: light, so
the command line's ``--help`` and flag errors import no torch), and one module per command: ``prepare``,
``train``, ``encode``, ``reconstruct``, ``verify``, ``export``, ``classify``, ``plot`` and ``pipeline``
(``run`` and ``demo``). No stage module imports another; ``pipeline`` runs them through the table.

May import: quackae.core, quackae.data, quackae.model, quackae.runs, quackae.viz, quackae.store,
quackae.eval.
"""

from quackae.stages.table import PIPELINE_STAGES, STAGES, Stage

__all__ = ["PIPELINE_STAGES", "STAGES", "Stage"]
