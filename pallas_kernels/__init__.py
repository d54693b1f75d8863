"""Pallas kernels for block-sparse attention (depends on nothing else of this repo).

`sparse_attention(q, k, v, *, pattern, stride, summary, part, block_q, block_k, interpret)` runs the Pallas
kernel; `reference_attention` (same signature) is the dense masked-softmax ground truth.
"""

from pallas_kernels.block_sparse_attention import sparse_attention
from pallas_kernels.block_sparse_attention import sparse_attention_reference as reference_attention

__all__ = ["reference_attention", "sparse_attention"]
