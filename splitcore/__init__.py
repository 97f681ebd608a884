"""The torch-free core shared by the client and the tail service.

It holds the contract written by ``export`` (the manifest and the wire format) and the onnxruntime code that runs a
head or a tail graph with its KV cache. Nothing here imports torch or transformers, and nothing here imports the
client or the service.
"""
