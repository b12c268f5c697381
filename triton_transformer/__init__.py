"""triton_transformer: every kernel of a GPT in OpenAI Triton, and the GPT they make.

Importing the package first chooses where kernels run (see `runtime`): compiled
on a CUDA GPU, or under Triton's interpreter on a CPU.
"""

from . import runtime  # noqa: F401  (must come first: sets TRITON_INTERPRET before triton is imported)
from .runtime import DEVICE, INTERPRET, default_dtype  # noqa: F401
from .softmax import softmax  # noqa: F401
# kernel exports: one line per module, in chapter order
from .layernorm import add_layer_norm, layer_norm  # noqa: F401
from .dropout import dropout  # noqa: F401
from .matmul import feed_forward, linear  # noqa: F401
from .attention import attention, attention_qkv  # noqa: F401
from .cross_entropy import cross_entropy  # noqa: F401
from .transformer import Transformer, TransformerConfig  # noqa: F401

__version__ = "0.1.0"
