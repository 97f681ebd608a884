"""``make bench-wan``: split inference over a delayed link, speculation on and off (see __main__.py)."""
