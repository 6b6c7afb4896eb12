"""Pure tensor code of the closed-form solve: the normal equations and their routes (rows,
im2col patches, displaced products, projected and narrow-side systems), their conditioning
diagnosis, and the fold algebra. Nothing here knows about graphs."""

from fxkd.solve.normal import Conditioning, NormalEquations, all_reduce_sum

__all__ = ["Conditioning", "NormalEquations", "all_reduce_sum"]
