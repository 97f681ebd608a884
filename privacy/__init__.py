"""The privacy meter: how much of a prompt an honest-but-curious tail operator recovers from the hidden states."""
