"""The ground floor: what every other package of quackae stands on.

Owns: the errors a user sees as one line (``errors``), reading any file a stage reads (``files``,
``safeyaml``), outputs that appear whole or not at all (``atomic``), the keyed id hash (``ids``), this
process's rank and launcher job (``ranks``), one live job per folder (``joblock``), the cores a process may
use (``cores``), the process-wide settings the command line applies (``process``) and the base of every
stage's typed result (``results``).

May import: nothing of quackae outside this package. Nothing here imports torch, Lightning, datasets or
pyarrow at the top.
"""
