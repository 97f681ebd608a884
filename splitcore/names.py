"""Graph input and output names shared by export and runtime (the optimum-onnx / onnxruntime-genai conventions).

Layer indices in KV names are global: the tail's first KV input is ``past_key_values.K.key``.

Every KV input is a fixed-size buffer [batch, kv_heads, kv_buffer_length, head_dim] that the graph writes in place
(onnxruntime's ``GroupQueryAttention`` with past and present bound to the same memory). Which positions a row holds
is stated by ``seqlens_k`` (positions the row holds after this step, minus one: the operator's own convention) and
``total_sequence_length`` (the largest of those plus one), so rows of different lengths share one run.
"""

INPUT_IDS = "input_ids"
HIDDEN_STATES = "hidden_states"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
LOGITS = "logits"
# Private-output mode: the tail returns the residual stream after its last layer, before the final norm.
FINAL_HIDDEN_STATES = "final_hidden_states"
LOGITS_TO_KEEP = "logits_to_keep"

BATCH = "batch_size"
SEQUENCE = "sequence_length"
KV_BUFFER = "kv_buffer_length"
KEPT_SEQUENCE = "kept_sequence_length"


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"
