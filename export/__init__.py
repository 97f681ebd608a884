"""Export a Llama-family model as a head/tail pair of ONNX graphs plus the manifest that describes them."""
