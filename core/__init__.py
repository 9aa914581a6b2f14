"""nasc: a split-computing compiler.

Cut an ONNX model into a device head and a server tail, optionally compress the cut
tensor to int8, compile each half with TVM for its own target, and verify the pair
numerically against ONNX Runtime on the original model.
"""

__version__ = "0.1.0"
