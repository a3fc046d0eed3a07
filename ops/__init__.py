"""The ``ai.datafree`` custom op domain of dynamic-precision models.

``domain`` (name and version, defined once), ``schemas`` (for onnx's checker and
shape inference), ``functions`` (ONNX function bodies: any onnxruntime runs the
model), ``kernels`` (onnxruntime-extensions Python kernels), ``reference`` (the
maths in numpy, shared by all of them and by the dynamic pass).

The compressor and the runtime both import this package, and it imports only onnx,
onnxruntime, numpy (and onnxruntime-extensions where present): ``errors`` (the
``UserError`` both raise) and ``selector`` (the bit selector's rule and its price
per bit, which the compressor fits and ``datafree.runtime.retarget`` sets again)
live here for that reason.

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
``clip(round(w_int·w_scale / s_b), ±(2^(b−1)−1))·s_b``.  The compressor picks the
integers so that every requantised bit-width is itself a fitted (GPTQ) rounding
(``toolchain.passes.fit.nested_gptq``).  Storing one tensor per bit-width would cost
4+6+8 = 18 bits per weight instead of 8 and buys nothing: on ResNet-20 (BN folded,
4/6/8 bits per stage, 1000 CIFAR-10 dev images) the 27 stage configurations average
81.7 % top-1 from the nested int8 weights and 81.5 % with GPTQ weights stored per
bit-width (80.7 % requantising a plain round-to-nearest int8).
"""
