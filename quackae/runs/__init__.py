"""A training run: what ``quackae train`` writes into a RUN folder and reads back on a resume.

Owns: one live training per RUN (``lock``), what a RUN trained on (``record``: ``run.json`` and the record in
every checkpoint), its metrics history and the series read from it (``logs``), how long training takes and
keeping it to ``--max-time`` (``budget``), the held-out greedy reconstruction figures (``heldout``) and
what a training reports, ``TrainResult`` in ``summary.json`` (``summary``).

May import: quackae.core, quackae.data, quackae.model.
"""
