"""fxp: fixed-point quantization and quantized parameter updates for PyTorch.

Importing fxp loads libfxp, which registers the ``torch.ops.fxp.*`` operators.
"""

from ._library import load as _load

library_path = _load()

from . import adapt, msq, nn, optim  # noqa: E402
from .format import FxpFormat  # noqa: E402
from .ops import (  # noqa: E402
    format_histogram,
    load_codes,
    pack,
    pack_bits,
    pack_seeded,
    unpack,
    unpack_bits,
    quantize,
    quantize_,
    quantize_mask,
    quantize_seeded,
    quantize_seeded_,
    quantize_seeded_stats,
    quantize_members,
    quantize_stats,
    quantize_ste,
    store_codes,
)

__version__ = "0.1.0"

__all__ = [
    "FxpFormat",
    "adapt",
    "format_histogram",
    "library_path",
    "load_codes",
    "msq",
    "nn",
    "optim",
    "pack",
    "pack_bits",
    "pack_seeded",
    "unpack",
    "unpack_bits",
    "quantize",
    "quantize_",
    "quantize_mask",
    "quantize_seeded",
    "quantize_seeded_",
    "quantize_seeded_stats",
    "quantize_members",
    "quantize_stats",
    "quantize_ste",
    "store_codes",
]
