"""Graph input and output names shared by export and runtime (the optimum-onnx conventions).

Layer indices in KV names are global: the tail's first KV input is ``past_key_values.K.key``.
"""

INPUT_IDS = "input_ids"
HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Private-output mode: the tail returns the residual stream after its last layer, before the final norm.
FINAL_HIDDEN_STATES = "final_hidden_states"
LOGITS_TO_KEEP = "logits_to_keep"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST_SEQUENCE = "past_sequence_length"
TOTAL_SEQUENCE = "total_sequence_length"
KEPT_SEQUENCE = "kept_sequence_length"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"
