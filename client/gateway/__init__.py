"""A local OpenAI-compatible server on the split: tokenizer and head here, hidden states to the tail service."""
