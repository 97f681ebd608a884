"""The thin client: tokenizer, chat template and the head run here; only hidden states leave the machine."""
