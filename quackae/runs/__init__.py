"""A training run: what ``quackae train`` writes into a RUN folder and reads back on a resume.

Owns: one live training per RUN (``lock``), what a RUN trained on (``record``: ``run.json`` and the record in
every checkpoint), its metrics history (``logs``), and the fit itself (``fitting``: the Trainer and its
callbacks, why training stopped, the summary; ``heldout``: greedy reconstruction figures).

May import: quackae.core, quackae.data, quackae.model.
"""
