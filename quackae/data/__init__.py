"""The data: from corpus files to the batches a model sees.

Owns: reading corpus files into rows and judging them (``readers``), the docstring corpora (``corpus``), the
BPE tokenizer and the one tokenizing rule (``tokenizer``), the prepared folder (``prepared``: reading,
fingerprint, marker; ``building``: writing one whole), which items a store keeps (``selection``), the id-hash
split and bucketed batches (``sampler``), padding and the one length-sorted batching loop (``padding``),
``TokenizedDataModule`` (``module``) and the predict loop's data and batch formats (``predict``).

May import: quackae.core.
"""
