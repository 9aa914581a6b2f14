import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from nasc.partitioner import analyze, cut_from_tensors, enumerate_cuts, load_model  # noqa: E402
from nasc.search.nas import defaults as D  # noqa: E402
from nasc.search.nas.export import export_subnet, run_onnx, split_metadata  # noqa: E402
from nasc.search.nas.space import NB201Space, SpaceConfig  # noqa: E402

CFG = SpaceConfig(channels=4, cells_per_stage=1, resolution=8)


@pytest.mark.parametrize("arch", [
    "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_1x1~2|",
    "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|",  # identity cell
    "|nor_conv_1x1~0|+|none~0|none~1|+|none~0|none~1|none~2|",  # zero cell
    "|avg_pool_3x3~0|+|skip_connect~0|avg_pool_3x3~1|+|avg_pool_3x3~0|skip_connect~1|avg_pool_3x3~2|",
])
def test_export_matches_torch_and_names_every_split(arch):
    space = NB201Space()
    torch.manual_seed(0)
    net = space.build_supernet(CFG).subnet(space.arch_index(arch)).eval()
    model, tensors = export_subnet(net, CFG.input_shape, {"nasc.arch": arch})
    assert model.opset_import[0].version == D.ONNX_OPSET
    assert [o.name for o in model.graph.output] == ["logits"]
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(model, x), want, rtol=1e-4, atol=1e-5)
    an = analyze(load_model(model))
    cuts = enumerate_cuts(an)
    nb = len(net.blocks)
    for k in range(1, nb):
        t = split_metadata(k, nb, tensors)
        assert cut_from_tensors(an, cuts, [t]).tensors == (t,)
    assert split_metadata(0, nb, tensors) == "" and split_metadata(nb, nb, tensors) == D.SPLIT_DEVICE_ONLY
    assert {p.key: p.value for p in model.metadata_props}["nasc.arch"] == arch
    onnx.checker.check_model(model)


def test_annotated_split_is_what_nasc_compile_cuts(tmp_path):
    """A chosen subnet with `nasc.split` set compiles through nasc's compile path at that cut."""
    from nasc.compile import compile_model
    from nasc.search.nas.export import set_metadata

    space = NB201Space()
    torch.manual_seed(0)
    net = space.build_supernet(CFG).subnet(6111).eval()
    model, tensors = export_subnet(net, CFG.input_shape)
    set_metadata(model, D.SPLIT_METADATA_KEY, tensors[3])
    path = tmp_path / "chosen.onnx"
    onnx.save(model, str(path))
    manifest = compile_model(path, tmp_path / "art", split="annotated", backend="ort")
    assert manifest["split"]["tensors"] == [tensors[3]] and manifest["split"]["kind"] == "split"
