"""Bundled example models, built in code as ONNX (no downloads, seeded weights).

Each builder covers a structure the partitioner must cut: residual adds (ResNet),
parallel branches (Inception), growing concatenations (DenseNet), depthwise inverted
residuals (MobileNetV2), channel shuffles (ShuffleNet) and attention blocks (ViT).
"""

from __future__ import annotations

import numpy as np
import onnx

from nasc.errors import ModelError
from nasc.examples.builder import Net

DEFAULT_EXAMPLE = "resnet18"


def tiny(resolution: int = 16, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Two convs, a residual add, a classifier: the smallest model with a multi-tensor cut."""
    n = Net("tiny", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    a = n.conv(x, 3, 8, 3)
    b = n.conv(a, 8, 8, 3, act=None)
    y = n.act(n.add(a, b), "relu")
    y = n.conv(y, 8, 16, 3, stride=2)
    return n.build(n.head(y, 16, classes), "tiny residual net")


def _basic_block(n: Net, x: str, cin: int, cout: int, stride: int) -> str:
    y = n.conv(x, cin, cout, 3, stride)
    y = n.conv(y, cout, cout, 3, act=None)
    short = x if stride == 1 and cin == cout else n.conv(x, cin, cout, 1, stride, act=None)
    return n.act(n.add(y, short), "relu")


def resnet(depths=(2, 2, 2, 2), widths=(64, 128, 256, 512), resolution: int = 224, classes: int = 1000,
           seed: int = 0, name: str = "resnet18") -> onnx.ModelProto:
    """ResNet with basic blocks; the defaults are ResNet-18 (1.8 GMACs at 224x224)."""
    n = Net(name, seed)
    x = n.input("input", (1, 3, resolution, resolution))
    imagenet = resolution >= 64
    y = n.conv(x, 3, widths[0], 7 if imagenet else 3, 2 if imagenet else 1)
    if imagenet:
        y = n.maxpool(y)
    cin = widths[0]
    for stage, (d, w) in enumerate(zip(depths, widths)):
        for b in range(d):
            y = _basic_block(n, y, cin, w, 2 if (b == 0 and stage > 0) else 1)
            cin = w
    return n.build(n.head(y, cin, classes), f"{name}: ResNet basic-block network")


def resnet18(resolution: int = 224, classes: int = 1000, seed: int = 0) -> onnx.ModelProto:
    return resnet(resolution=resolution, classes=classes, seed=seed, name="resnet18")


def resnet8(resolution: int = 32, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    return resnet((1, 1, 1), (16, 32, 64), resolution, classes, seed, name="resnet8")


def inception(resolution: int = 64, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """Inception-v1 style: each module runs 1x1, 3x3, double-3x3 and pool branches, then concatenates."""
    n = Net("inception", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    y = n.conv(x, 3, 32, 3, 2)
    cin = 32
    for i, c in enumerate((16, 24, 32)):
        b1 = n.conv(y, cin, c, 1)
        b2 = n.conv(n.conv(y, cin, c // 2, 1), c // 2, c, 3)
        b3 = n.conv(n.conv(n.conv(y, cin, c // 2, 1), c // 2, c, 3), c, c, 3)
        b4 = n.conv(n.avgpool(y), cin, c, 1)
        y = n.concat([b1, b2, b3, b4])
        cin = 4 * c
        if i < 2:
            y = n.maxpool(y)
    return n.build(n.head(y, cin, classes), "Inception-style multi-branch network")


def densenet(resolution: int = 32, classes: int = 10, seed: int = 0, growth: int = 12,
             layers: tuple[int, ...] = (4, 4, 4)) -> onnx.ModelProto:
    """DenseNet-BC style: every layer concatenates its output to all earlier features."""
    n = Net("densenet", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    y = n.conv(x, 3, 2 * growth, 3)
    c = 2 * growth
    for bi, nl in enumerate(layers):
        for _ in range(nl):
            z = n.conv(n.conv(y, c, 4 * growth, 1), 4 * growth, growth, 3)
            y = n.concat([y, z])
            c += growth
        if bi < len(layers) - 1:
            y = n.node("AveragePool", [n.conv(y, c, c // 2, 1)], kernel_shape=[2, 2], strides=[2, 2])
            c //= 2
    return n.build(n.head(y, c, classes), "DenseNet-style concatenating network")


def mobilenetv2(resolution: int = 96, classes: int = 10, seed: int = 0, width: float = 0.5) -> onnx.ModelProto:
    """MobileNetV2: inverted residuals with depthwise 3x3 convs and ReLU6."""
    n = Net("mobilenetv2", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    ch = lambda c: max(8, int(c * width + 4) // 8 * 8)  # noqa: E731
    y = n.conv(x, 3, ch(32), 3, 2, act="relu6")
    cin = ch(32)
    # (expansion, channels, repeats, stride) as in the MobileNetV2 paper
    for t, c, reps, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 2, 2)):
        cout = ch(c)
        for r in range(reps):
            stride = s if r == 0 else 1
            hidden = cin * t
            z = n.conv(y, cin, hidden, 1, act="relu6") if t != 1 else y
            z = n.conv(z, hidden, hidden, 3, stride, groups=hidden, act="relu6")
            z = n.conv(z, hidden, cout, 1, act=None)
            y = n.add(y, z) if stride == 1 and cin == cout else z
            cin = cout
    y = n.conv(y, cin, ch(640), 1, act="relu6")
    return n.build(n.head(y, ch(640), classes), "MobileNetV2-style depthwise network")


def shufflenet(resolution: int = 64, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """ShuffleNetV2 units: channel split, a depthwise branch, concat and channel shuffle."""
    n = Net("shufflenet", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    y = n.maxpool(n.conv(x, 3, 24, 3, 2))
    c = 24
    res = resolution // 4
    for stage, cout in enumerate((48, 96)):
        res //= 2
        # downsampling unit: both branches see the whole input
        a = n.conv(n.conv(y, c, c, 3, 2, groups=c, act=None), c, cout // 2, 1)
        b = n.conv(n.conv(n.conv(y, c, cout // 2, 1), cout // 2, cout // 2, 3, 2, groups=cout // 2, act=None), cout // 2, cout // 2, 1)
        y = _shuffle(n, n.concat([a, b]), cout, res)
        c = cout
        for _ in range(2):
            left, right = n.node("Split", [y, n.const(np.array([c // 2, c // 2], np.int64), "split")], n_out=2, axis=1)
            r = n.conv(n.conv(n.conv(right, c // 2, c // 2, 1), c // 2, c // 2, 3, groups=c // 2, act=None), c // 2, c // 2, 1)
            y = _shuffle(n, n.concat([left, r]), c, res)
    return n.build(n.head(y, c, classes), "ShuffleNetV2-style network with channel shuffles")


def _shuffle(n: Net, x: str, c: int, res: int) -> str:
    y = n.node("Reshape", [x, n.shape_const([1, 2, c // 2, res, res])])
    y = n.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    return n.node("Reshape", [y, n.shape_const([1, c, res, res])])


def vit(resolution: int = 32, classes: int = 10, seed: int = 0, patch: int = 4, dim: int = 64,
        depth: int = 2, heads: int = 4) -> onnx.ModelProto:
    """A small Vision Transformer: patch embedding, pre-norm attention + MLP blocks, mean pooling."""
    n = Net("vit", seed)
    x = n.input("input", (1, 3, resolution, resolution))
    tokens = (resolution // patch) ** 2
    w = n.const((n.rng.standard_normal((dim, 3, patch, patch)) * np.sqrt(2.0 / (3 * patch * patch))).astype(np.float32))
    y = n.node("Conv", [x, w], prefix="patch", kernel_shape=[patch, patch], strides=[patch, patch])
    y = n.node("Reshape", [y, n.shape_const([1, dim, tokens])])
    y = n.node("Transpose", [y], perm=[0, 2, 1])
    y = n.add(y, n.const((0.02 * n.rng.standard_normal((1, tokens, dim))).astype(np.float32), "pos"))
    hd = dim // heads
    for _ in range(depth):
        h = n.layernorm(y, dim)
        qkv = []
        for _ in range(3):
            t = n.node("Reshape", [n.matmul(h, dim, dim), n.shape_const([1, tokens, heads, hd])])
            qkv.append(n.node("Transpose", [t], perm=[0, 2, 1, 3]))
        q, k, v = qkv
        kt = n.node("Transpose", [k], perm=[0, 1, 3, 2])
        s = n.node("Mul", [n.node("MatMul", [q, kt]), n.const(np.array(1.0 / np.sqrt(hd), np.float32), "c")])
        a = n.node("MatMul", [n.node("Softmax", [s], axis=-1), v])
        a = n.node("Reshape", [n.node("Transpose", [a], perm=[0, 2, 1, 3]), n.shape_const([1, tokens, dim])])
        y = n.add(y, n.matmul(a, dim, dim))
        h = n.layernorm(y, dim)
        y = n.add(y, n.matmul(n.act(n.matmul(h, dim, 2 * dim), "gelu"), 2 * dim, dim))
    y = n.node("ReduceMean", [n.layernorm(y, dim)], axes=[1], keepdims=0)
    return n.build(n.linear(y, dim, classes, prefix="logits"), "small Vision Transformer")


EXAMPLES = {
    "tiny": tiny,
    "resnet8": resnet8,
    "resnet18": resnet18,
    "inception": inception,
    "densenet": densenet,
    "mobilenetv2": mobilenetv2,
    "shufflenet": shufflenet,
    "vit": vit,
}


def build(name: str = DEFAULT_EXAMPLE, **kwargs) -> onnx.ModelProto:
    """Build a bundled example by name (see EXAMPLES); kwargs such as resolution pass through."""
    if name not in EXAMPLES:
        raise ModelError(f"unknown example '{name}'; bundled examples: {', '.join(EXAMPLES)}")
    return EXAMPLES[name](**kwargs)
