"""The tail service: holds the tail graph and one KV cache per client session, and samples the next token."""
