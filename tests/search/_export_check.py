"""The end-to-end check every searcher's export shares (the end-to-end tests of DAIS, PaS, FFP
and AST): the architecture record describes the exported network as counted on it, and the
network survives a save / load round trip bit for bit."""
import torch

import nasprune
from nasprune.search.base import pruned_architecture

KEYS = ("layer_widths", "macs", "params")


def check_record_and_round_trip(method, model, net, arch, x, probe, path, constructor, kwargs):
    """``arch`` (the searcher's architecture()) has the widths, MACs and params of ``net`` counted
    against ``model`` at input ``x``; ``net`` saved to ``path`` and loaded gives the same outputs
    on ``probe`` in eval."""
    assert {k: arch[k] for k in KEYS} == {k: v for k, v in pruned_architecture(method, model, net, x).items()
                                          if k in KEYS}
    net.eval()
    nasprune.save(net, path, constructor=constructor, kwargs=kwargs)
    loaded = nasprune.load(path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), net(probe))
