"""Routing metrics (fluctuation, agreement, load, entropy) and the hook-based routing recorder."""
from .recorder import RoutingRecorder
from .routing import (
                      FluctuationTracker,
                      changed_share,
                      fluctuation_curve,
                      last_fluctuation_epoch,
                      load_cv,
                      routing_agreement,
                      routing_entropy,
                      window_mean,
)

__all__ = ['RoutingRecorder', 'FluctuationTracker', 'changed_share', 'fluctuation_curve', 'last_fluctuation_epoch',
           'load_cv', 'routing_agreement', 'routing_entropy', 'window_mean']
