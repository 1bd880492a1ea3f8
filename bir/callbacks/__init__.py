"""Lightning callbacks: the prediction writer and image logging."""

from bir.callbacks.prediction_writer import PredictionWriter

__all__ = ["PredictionWriter"]
