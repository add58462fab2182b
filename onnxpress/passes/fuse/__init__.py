"""Operator fusion: the `fuse` pass and the pattern API users extend it with.

    from onnxpress.passes import fuse
    fuse.list_fusions()                      # every fusion, in the order the pass tries them
    @fuse.fusion("my_fusion", priority=50)   # register your own (see api.py and docs/fuse.md)

Families (one module each): activation (GELU, SiLU, HardSwish, Mish), norm (LayerNorm,
RMSNorm, SkipLayerNorm), attention (BERT/ViT attention -> com.microsoft.Attention), conv
(BatchNorm/Mul/Add/Pad folded into Conv, Gemm, MatMul; Conv+activation), matmul (MatMul+Add ->
Gemm, constant chains), layout (Transpose/Reshape/Squeeze/Concat/Split identities).
"""

from onnxpress.passes.fuse import activation, attention, conv, layout, matmul, norm  # noqa: F401,E402
from onnxpress.passes.fuse.api import (  # noqa: F401
    MS_DOMAIN,
    Fusion,
    attr,
    const,
    fusion,
    get_fusion,
    is_float,
    is_scalar,
    list_fusions,
    new_initializer,
    rank,
    scalar,
    shape,
    unregister_fusion,
)
from onnxpress.passes.fuse.fuse_pass import fuse  # noqa: F401,E402
