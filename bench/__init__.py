"""``python -m bench``: the split against the alternatives, side by side in one run on one machine."""
