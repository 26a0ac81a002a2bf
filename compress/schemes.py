"""Which parts of the detector INT8 may touch: a ladder from fastest to most faithful.

OneNIP's anomaly map is a DIFFERENCE of two large quantities (the backbone's features and their
reconstruction), so activation-quantisation noise in the frozen backbone lands in the map
directly. Measured on a trained lite2 model (piped, 160 px, compress dev notes in the report):
quantising everything moved maps by ~1.5 % of their range on average, keeping the stride-2 stem
in float cut that to ~0.5 %, keeping the whole backbone in float to ~0.1 %; detection metrics
stayed within budget in all three. The INT8 gate picks the first rung that passes.

* `full`           — every convolution, MatMul and attention quantised;
* `float-stem`     — the stride-2 backbone convolutions stay float (high resolution, few FLOPs);
* `float-backbone` — only ops downstream of the transformer's first MatMul (transformer, refiner)
  are quantised; backbone and neck run in float.

In every rung the map's resize to the input (`MatrixUpsample`: constant matrix products after the
refiner and after the L2 error) stays float: it costs ~0.05 ms, and 8-bit logits would put a
visible step into the map right where the sigmoid is steepest. So does the normal statistics'
quadratic form (`stats_matmuls`).
"""

from __future__ import annotations

from typing import Any

SCHEMES: tuple[str, ...] = ("full", "float-stem", "float-backbone")
#: NNCF presets, fastest first: symmetric activations, then asymmetric (zero points)
PRESETS: tuple[str, ...] = ("performance", "mixed")
#: precision of the ops INT8 leaves in float, fastest first (a compile hint: no re-quantization)
FLOAT_OPS: tuple[str, ...] = ("bf16", "f32")
CONV_TYPES = ("Convolution", "GroupConvolution")


def downstream(model: Any, sources: tuple[str, ...]) -> list[tuple[Any, bool]]:
    """(op, reached) in topological order; reached = the op's type is one of `sources` or one of
    its inputs comes from a reached op."""
    reached: set[str] = set()
    out = []
    for op in model.get_ordered_ops():
        hit = op.get_type_name() in sources or any(
            inp.get_source_output().get_node().get_friendly_name() in reached for inp in op.inputs()
        )
        if hit:
            reached.add(op.get_friendly_name())
        out.append((op, hit))
    return out


def backbone_convs(model: Any) -> list[Any]:
    """Conv ops with no MatMul upstream (the backbone's, not the refiner's), topological order."""
    return [
        op
        for op, after_matmul in downstream(model, ("MatMul",))
        if not after_matmul and op.get_type_name() in CONV_TYPES
    ]


def resize_matmuls(model: Any) -> list[str]:
    """MatMuls downstream of the refiner's transposed convs or of the L2 error's Sqrt: the
    constant-matrix resize of the maps to the input size (nothing else lies there)."""
    return [
        op.get_friendly_name()
        for op, in_tail in downstream(model, ("Sqrt", "ConvolutionBackpropData"))
        if in_tail and op.get_type_name() == "MatMul"
    ]


def _constant_source(output: Any) -> bool:
    """The output comes from a Constant (through a Convert, as compressed weights do)."""
    node = output.get_node()
    if node.get_type_name() == "Convert":
        node = node.input(0).get_source_output().get_node()
    return node.get_type_name() == "Constant"


def stats_matmuls(model: Any) -> list[str]:
    """The normal statistics' batched quadratic form (train/normal_stats.py): MatMuls with a
    3-D constant operand, one precision matrix per position. It stays float in every rung: the
    Mahalanobis distance is a small difference of large descriptors, amplified by the precision,
    which 8 bits would drown."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        for inp in op.inputs():
            src = inp.get_source_output()
            if _constant_source(src) and src.get_partial_shape().rank.get_length() == 3:
                out.append(op.get_friendly_name())
                break
    return out


def ignored_scope(model: Any, scheme: str) -> Any:
    """The NNCF IgnoredScope for `scheme` on the detector `model`."""
    import nncf

    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose from {SCHEMES}")
    names = resize_matmuls(model) + stats_matmuls(model)
    if scheme == "full":
        return nncf.IgnoredScope(names=names)
    size = model.input("image").get_partial_shape()[1].get_length()
    convs = backbone_convs(model)
    if scheme == "float-stem":
        convs = [c for c in convs if c.get_output_partial_shape(0)[2].get_length() * 2 >= size]
        return nncf.IgnoredScope(names=names + [c.get_friendly_name() for c in convs])
    names += [c.get_friendly_name() for c in convs]
    return nncf.IgnoredScope(names=names, types=["Interpolate"])
