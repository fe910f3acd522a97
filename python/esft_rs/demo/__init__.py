"""The built-in demo: ESFT end to end on generated tasks (``esft-rs demo``)."""
