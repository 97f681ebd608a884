"""The three attacks: logit lens (and nearest embedding), a learned inverter, and replay search."""
