"""torch export (BN kept, dynamic batch, external data), module sources, and the pipeline."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import zoo
from datafree.exporters import compress_module, export, load_factory, load_torchscript
from datafree.exporters.torch_export import parse_shape
from datafree.toolchain.errors import UserError
from datafree.toolchain.graph import analyse
from datafree.toolchain.ingest import load
from datafree.toolchain.recipe import METADATA_KEY, Recipe

ATOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_export_keeps_batchnorm(tmp_path):
    module = zoo.mobilenet_like()
    path = export(module, torch.zeros(zoo.IMAGE), tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    onnx.checker.check_model(str(path))
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in module.modules())
    assert _ops(path).count("BatchNormalization") == bns == 5
    assert {l.bn is not None for l in analyse(load(path)).layers if l.kind != "gemm"} == {True}


@pytest.mark.parametrize("batch", [1, 5])
def test_dynamic_batch(batch, tmp_path):
    module = zoo.conv_bn_relu_conv()
    path = export(module, (1, 3, 32, 32), tmp_path / "m.onnx")
    x = zoo.images(batch, zoo.IMAGE[1:], seed=batch)
    np.testing.assert_allclose(zoo.run(path, x), zoo.run_torch(module, x), atol=ATOL, rtol=0)


def test_fixed_batch(tmp_path):
    path = export(zoo.mlp(), (2, 64), tmp_path / "m.onnx", dynamic_batch=False, opset=13)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert proto.opset_import[0].version == 13


def test_forced_external_data(tmp_path):
    module = zoo.vgg_like()
    path = export(module, torch.zeros(zoo.IMAGE), tmp_path / "m.onnx", external_data=True)
    data = tmp_path / "m.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporaries left
    x = zoo.images(2, zoo.IMAGE[1:])
    np.testing.assert_allclose(zoo.run(load(path), x), zoo.run_torch(module, x), atol=ATOL, rtol=0)


def test_training_mode_restored_and_weights_untouched(tmp_path):
    module = zoo.conv_bn_relu_conv().train()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    export(module, torch.zeros(zoo.IMAGE), tmp_path / "m.onnx")
    assert module.training
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, a, b):
        return self.fc(a) + self.fc(b)


def test_two_inputs(tmp_path):
    module = zoo.randomize(TwoInputs())
    path = export(module, (torch.zeros(1, 8), torch.zeros(1, 8)), tmp_path / "m.onnx")
    sess = zoo.session(path)
    assert [i.name for i in sess.get_inputs()] == ["input", "input_1"]
    a, b = zoo.images(3, (8,), seed=1), zoo.images(3, (8,), seed=2)
    got = sess.run(None, {"input": a, "input_1": b})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("shape", [(1, 4, 32, 32), (1, 3, 32), (1, 3, 1, 1)])
def test_shape_that_does_not_fit(shape, tmp_path):
    with pytest.raises(UserError, match="does not fit") as err:
        export(zoo.vgg_like(), shape, tmp_path / "m.onnx")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_export_arguments(tmp_path):
    with pytest.raises(UserError, match="nn.Module"):
        export(object(), (1, 3), tmp_path / "m.onnx")
    with pytest.raises(UserError, match="output folder"):
        export(zoo.mlp(), (1, 64), tmp_path / "missing" / "m.onnx")
    with pytest.raises(UserError, match="positive"):
        export(zoo.mlp(), (0, 64), tmp_path / "m.onnx")


def test_parse_shape():
    assert parse_shape("1,3,32,32") == (1, 3, 32, 32) == parse_shape("1x3x32x32")
    for bad in ("", "1,a", "1,-3"):
        with pytest.raises(UserError):
            parse_shape(bad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_torchscript(tmp_path):
    module = zoo.conv_bn_relu_conv()
    torch.jit.save(torch.jit.script(module), str(tmp_path / "m.pt"))
    loaded = load_torchscript(tmp_path / "m.pt")
    x = zoo.images(2, zoo.IMAGE[1:])
    np.testing.assert_allclose(zoo.run_torch(loaded, x), zoo.run_torch(module, x), atol=1e-6, rtol=0)
    path = export(loaded, torch.zeros(zoo.IMAGE), tmp_path / "m.onnx")
    assert "BatchNormalization" in _ops(path)


def test_bad_torchscript(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(UserError, match="not a TorchScript model") as err:
        load_torchscript(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="no such file"):
        load_torchscript(tmp_path / "missing.pt")


FACTORY_FILE = """
import torch
from torch import nn

def good():
    return nn.Sequential(nn.Linear(4, 2))

def not_module():
    return 42

def broken():
    raise RuntimeError("weights not found")

NOT_CALLABLE = 3
"""


def test_load_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORY_FILE)
    assert isinstance(load_factory(f"{tmp_path / 'my_models.py'}:good"), nn.Sequential)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = load_factory("my_models:good")
    assert isinstance(module, nn.Sequential) and not module.training


def test_factory_module_in_the_working_folder(tmp_path, monkeypatch):
    """`datafree convert-and-compress my_net:build` run where my_net.py lives: the console
    script has no working folder on sys.path, the factory import adds it (and takes it away)."""
    (tmp_path / "my_models_cwd.py").write_text(FACTORY_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    assert isinstance(load_factory("my_models_cwd:good"), nn.Sequential)
    assert sys.path == before


@pytest.mark.parametrize("spec, message", [
    ("my_models", "must look like"),
    ("no_such_package_xyz.models:build", "cannot import"),
    ("my_models:missing", "no attribute"),
    ("my_models:NOT_CALLABLE", "not callable"),
    ("my_models:not_module", "returned int, not a torch nn.Module"),
    ("my_models:broken", "weights not found"),
    ("nowhere/models.py:good", "does not exist"),
])
def test_bad_factory(spec, message, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORY_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=message) as err:
        load_factory(spec)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------- pipeline
def test_compress_module(tmp_path):
    zoo.require_compress()
    module = zoo.conv_bn_relu_conv()
    recipe = Recipe(prune=0.25, wbits=8, abits=None, synthetic=0)
    path = compress_module(module, torch.zeros(zoo.IMAGE), recipe, path=tmp_path / "small.onnx")
    assert path == tmp_path / "small.onnx"
    model = load(path)
    written = Recipe.from_json(model.metadata_props[METADATA_KEY])   # the recipe, with the input it assumed
    assert written == recipe.replace(input_shape=[3, 32, 32], input_range=written.input_range)
    assert written.input_range is not None
    x = zoo.images(4, zoo.IMAGE[1:])
    out, ref = zoo.run(path, x), zoo.run_torch(module, x)
    assert out.shape == ref.shape and np.isfinite(out).all()
    in_memory = compress_module(module, (1, 3, 32, 32), recipe)
    np.testing.assert_allclose(zoo.run(in_memory, x), out, atol=1e-5, rtol=0)


def test_saved_model_leaves_redundant_value_info_out(tmp_path):
    """Initializers and Q/DQ outputs carry no value_info entry in the file; the
    in-memory model keeps its types; the file checks and runs the same."""
    zoo.require_compress()
    from datafree.exporters.writer import save, to_bytes
    from datafree.toolchain.compress import compress

    module = zoo.conv_bn_relu_conv()
    src = export(module, torch.zeros(zoo.IMAGE), tmp_path / "m.onnx")
    result = compress(load(src), Recipe(wbits=8, abits=8, synthetic=0))
    typed = {v.name: v.type for v in result.model.graph.initializers.values()}
    out = save(result.model, tmp_path / "q.onnx")
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    inits = {t.name for t in proto.graph.initializer}
    qdq = {o for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") for o in n.output}
    graph_io = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    listed = {v.name for v in proto.graph.value_info}
    assert not listed & inits and not listed & (qdq - graph_io)
    assert {v.name: v.type for v in result.model.graph.initializers.values()} == typed
    x = zoo.images(4, zoo.IMAGE[1:])
    np.testing.assert_array_equal(zoo.run(out, x), zoo.run(to_bytes(result.model), x))


@pytest.mark.parametrize("int4", [True, False])
def test_int4_storage_needs_no_note(int4, tmp_path):
    """INT4 weights run on the integer kernels INT8 ones do: the summary has nothing to warn about."""
    zoo.require_compress()
    from datafree.toolchain.compress import compress

    src = export(zoo.conv_bn_relu_conv(), torch.zeros(zoo.IMAGE), tmp_path / "m.onnx")
    for recipe in (Recipe(wbits=4, abits=8, synthetic=0, int4=int4), Recipe(wbits=4, synthetic=0, int4=int4)):
        notes = compress(load(src), recipe).summary.notes
        assert not any("INT4" in n or "--no-int4" in n or "disable_quant_qdq" in n for n in notes)


def test_written_models_leave_the_exporters_provenance_out(tmp_path):
    """torch's dynamo export records on every node and value where it came from (a stack
    trace with this machine's file paths, module names, FX nodes): no file ``save`` writes
    carries it, neither a plain copy nor a compressed model; the model's own metadata
    stays, and the model in memory keeps its records."""
    zoo.require_compress()
    import onnx_ir as ir

    from datafree.exporters.writer import save
    from datafree.toolchain.compress import compress

    src = zoo.dynamo(zoo.conv_bn_relu_conv(), tmp_path)
    raw = ir.load(src)
    assert all("pkg.torch.onnx.stack_trace" in n.metadata_props for n in raw.graph)
    before = {n.name: dict(n.metadata_props) for n in raw.graph}
    result = compress(load(src), Recipe(wbits=8, abits=8, synthetic=0))
    assert any(n.metadata_props for n in result.model.graph)       # carried through compression
    paths = [save(raw, tmp_path / "copy.onnx", metadata={"note": "kept"}),
             save(result.model, tmp_path / "q.onnx")]
    assert {n.name: dict(n.metadata_props) for n in raw.graph} == before
    for path in paths:
        proto, data = onnx.load(str(path)), path.read_bytes()
        g = proto.graph
        assert not any(n.metadata_props for n in g.node)
        assert not any(v.metadata_props for v in (*g.input, *g.output, *g.value_info, *g.initializer))
        assert b"stack_trace" not in data and str(ROOT).encode() not in data
    assert {p.key: p.value for p in onnx.load(str(paths[0])).metadata_props}["note"] == "kept"
    assert METADATA_KEY in {p.key for p in onnx.load(str(paths[1])).metadata_props}
    x = zoo.images(3, zoo.IMAGE[1:])
    np.testing.assert_array_equal(zoo.run(paths[0], x), zoo.run(src, x))
