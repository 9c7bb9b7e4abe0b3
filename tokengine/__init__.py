"""tokengine: kernels and an engine for studying vision-token scaling in VLMs."""

from tokengine.ops import QCCrossAttention, TokenPool, qc_cross_attention, token_pool

__version__ = "0.1.0"
__all__ = ["QCCrossAttention", "TokenPool", "qc_cross_attention", "token_pool"]
