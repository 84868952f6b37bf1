"""Pictures: attention maps, encodings, confusion matrices (``render``) and a RUN's curves (``curves``).

May import: quackae.core, quackae.data, quackae.runs (the metrics history ``curves`` draws).
"""
