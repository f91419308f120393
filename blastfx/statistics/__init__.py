"""Calibration statistics: what the layers' inputs and outputs look like on calibration data.

:class:`LayerStats` is the one record per layer the planner and the builder read; collection
(:mod:`.collect`) measures what they declare they need, on batches made by :mod:`.inputs`;
:mod:`.sensitivity` turns weights and statistics into the numbers the planner allocates by.
"""
from .collect import (batch_loss, check_reached, collect_covariances, collect_output_fisher, returns_loss,
                      run_batch, singular_covariance_error)
from .inputs import calibration_batches, forward_takes
from .layer_stats import LayerStats, collect_statistics, field_of, stacked

__all__ = ["LayerStats", "batch_loss", "calibration_batches", "check_reached", "collect_covariances",
           "collect_output_fisher", "collect_statistics", "field_of", "forward_takes", "returns_loss",
           "run_batch", "singular_covariance_error", "stacked"]
