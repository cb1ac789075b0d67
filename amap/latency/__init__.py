"""Latency: measuring models side by side (:func:`measure_latency`) and pruning to a latency target measured on the
device -- the calibration (:func:`calibrate_latency`), the model the search and the target guarantee use
(:class:`LatencyModel`) and the closed loop that checks the cut model (:mod:`amap.latency.closed_loop`)."""
from .calibrate import calibrate_latency, detect_step
from .measure import BACKENDS, Backend, LatencyWarning, make_backend, measure_latency
from .model import LatencyModel, OpTable

__all__ = ['measure_latency', 'calibrate_latency', 'detect_step', 'LatencyModel', 'OpTable', 'BACKENDS', 'Backend',
           'make_backend', 'LatencyWarning']
