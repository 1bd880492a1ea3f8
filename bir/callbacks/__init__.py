"""Lightning callbacks and the image logging they share with the training modules.

* :mod:`bir.callbacks.prediction_writer`: :class:`PredictionWriter`, what predict runs write.
* :mod:`bir.callbacks.images`: :func:`log_grid` sends an image grid (:func:`comparison_grid`)
  to every attached logger (W&B-style ``log_image``, TensorBoard ``add_image``).
* :mod:`bir.callbacks.progress`, :mod:`bir.callbacks.net_config`: the step progress bar and the
  network config stored in checkpoints.

The EMA of the weights is :class:`bir.lit.ema.EMACallback`.
"""

from bir.callbacks.images import comparison_grid, log_grid
from bir.callbacks.prediction_writer import PredictionWriter

__all__ = ["PredictionWriter", "comparison_grid", "log_grid"]
