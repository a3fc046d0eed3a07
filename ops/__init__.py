"""The ``ai.datafree`` custom op domain of dynamic-precision models.

``domain`` (name and version, defined once), ``schemas`` (for onnx's checker and
shape inference), ``functions`` (ONNX function bodies: any onnxruntime runs the
model), ``kernels`` (faster onnxruntime-extensions kernels), ``reference`` (the
maths in numpy).
"""
