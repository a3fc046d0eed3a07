"""The ``ai.datafree`` custom op domain of dynamic-precision models.

``domain`` (name and version, defined once), ``schemas`` (for onnx's checker and
shape inference), ``functions`` (ONNX function bodies: any onnxruntime runs the
model), ``kernels`` (onnxruntime-extensions Python kernels), ``reference`` (the
maths in numpy, shared by all of them and by the dynamic pass).

| op | inputs → outputs |
|---|---|
| ``BitSelect`` | features [N,C,…], W1 [C,H], b1, W2 [H,K], b2, bits_table [K,G] → config int64 [N], bits [N,G] |
| ``DynQuant`` (``signed``) | x [N,…], bits [N], scale [B], zero_point [B] → y |
| ``DynQConv`` (Conv attrs) | x, bits [N], w_int int8, w_scale [O], scale_table [B,O], bias [O] → y |
| ``DynQGemm`` | x [N,K], bits [N], w_int int8 [O,K], w_scale [O], scale_table [B,O], bias [O] → y [N,O] |

Tables are indexed by bit-width (B = highest bit-width + 1), so a sample's
bit-width is directly the index of its scale.

Weights are stored once, as int8 integers at the highest candidate precision;
the weights at ``b`` bits are requantised from them,
``clip(round(w_int·w_scale / s_b), ±(2^(b−1)−1))·s_b``.  Storing one tensor per
bit-width would cost 4+6+8 = 18 bits per weight instead of 8, and buys nothing:
on ResNet-20 (BN folded, weights and layer inputs at the same bits, 1000 CIFAR-10
dev images) requantising from int8 gave 79.0 / 82.6 / 83.0 % at 4 / 6 / 8 bits
against 77.7 / 82.4 / 83.0 % when quantizing the float weights directly.
"""
