"""Physical slimming: ``apply`` cuts removed channels out of a model, ``mask`` zeroes them
(the reference), ``uniform`` keeps the leading channels of every group and ``uniform_at`` does
so at a MACs target (the control every pruning method is compared with). Layer types are
supported through the handler registry in :mod:`nasprune.handlers` (re-exported here)."""
from nasprune.slim.apply import SlimError, apply, check_runs
from nasprune.handlers import LayerHandler, handler_for, register
from nasprune.handlers.keep import KeepError
from nasprune.slim.mask import mask
from nasprune.slim.uniform import uniform, uniform_at, uniform_keep, uniform_keep_at

__all__ = ["apply", "mask", "uniform", "uniform_at", "uniform_keep", "uniform_keep_at", "check_runs",
           "KeepError", "SlimError", "LayerHandler", "handler_for", "register"]
