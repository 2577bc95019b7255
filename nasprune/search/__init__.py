"""Searchers: ``TAS``, ``DAIS``, ``PaS``, ``FFP``, ``AST``; the shared API (``Searcher``,
``Callback``, checkpoints) in base; the gated network every gate-based method searches
(``GatedNetwork``) in gated; the base of the gate-based searchers (``GatedSearcher``: DAIS, PaS,
FFP, AST) in gated_searcher."""
from nasprune.models.pruned_resnet import ResNetSpec, TASResNet, tas_resnet
from nasprune.search.ast_search import AST, ThreshNet
from nasprune.search.base import Callback, Searcher, load_checkpoint, save_checkpoint
from nasprune.search.dais import DAIS
from nasprune.search.ffp import FFP, MemoryBank, ckt_loss
from nasprune.search.gated import GatedNetwork
from nasprune.search.gated_searcher import GatedSearcher, gates_as
from nasprune.search.pas import PaS
from nasprune.search.tas import TAS, cost_loss, temperature
from nasprune.search.tas_net import TASSupernet, aggregate_widths, cwi, resnet_spec, sample_widths

__all__ = ["AST", "Callback", "DAIS", "FFP", "GatedNetwork", "GatedSearcher", "MemoryBank", "PaS", "ResNetSpec",
           "Searcher", "TAS", "TASResNet", "TASSupernet", "ThreshNet", "aggregate_widths", "ckt_loss",
           "cost_loss", "cwi", "gates_as", "load_checkpoint", "resnet_spec", "sample_widths",
           "save_checkpoint", "tas_resnet", "temperature"]
