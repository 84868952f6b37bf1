"""How good stored encodings are: splits, probes and a classifier folder.

Owns: the linear probe, the bag-of-tokens baseline and the per-class hash order of the probe subsets
(``probes``), a classifier folder written whole and read back whole (``folder``) and what a classify
reports (``report``).

May import: quackae.core, quackae.data, quackae.model, quackae.viz, quackae.store.
"""
