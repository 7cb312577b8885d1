"""Pure forward/backward pairs: `y, cache = op_forward(...)`, `grads = op_backward(dy, cache)`.

Each forward uses no in-place writes, so autograd can differentiate the very code we ship;
each backward is checked against autograd and against finite differences in the tests.
"""

from .attention import attention_backward, attention_forward, attention_visibility
from .cross_entropy import IGNORE_INDEX, cross_entropy_backward, cross_entropy_forward
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_tanh_backward, gelu_tanh_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .softmax import softmax_backward, softmax_forward

__all__ = [
    "IGNORE_INDEX",
    "attention_backward",
    "attention_forward",
    "attention_visibility",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_tanh_backward",
    "gelu_tanh_forward",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
    "softmax_backward",
    "softmax_forward",
]
