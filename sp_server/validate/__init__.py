"""Validation of a model against its oracle: the paper's tables and figures, side by side (issue 8).

The items, in the order they run (see :mod:`sp_server.validate.run`)."""
ITEMS = ("ground_state", "metastable", "phonons", "transport", "transitions", "double_well", "accuracy")
