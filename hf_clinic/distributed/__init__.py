"""Communication-efficient local gradient clipping (CELGC, arXiv:2205.05040) on Accelerate and the Trainer.

* [`LocalGradientClipping`]: a `with` block + `step()` for plain Accelerate loops (the `LocalSGD` shape).
* [`LocalClippingCallback`]: the same algorithm under `transformers.Trainer`.
* [`ReplicaAverager`]: one flattened all-reduce per dtype for parameters, buffers and optionally optimizer state.
"""

from .averaging import ReplicaAverager
from .callback import LocalClippingCallback
from .local_clipping import LocalGradientClipping


__all__ = ["LocalClippingCallback", "LocalGradientClipping", "ReplicaAverager"]
