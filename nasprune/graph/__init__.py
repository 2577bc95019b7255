"""Channel dependency analysis: which channels of which layers must be removed together.

``trace(model, example_inputs)`` returns a :class:`ChannelGraph` whose ``groups`` list the
channel groups (``.size``, ``.members``, ``.prunable``); ``print(graph)`` summarises them.
"""
from nasprune.graph.analysis import trace
from nasprune.graph.groups import ChannelGraph, ChannelGroup, IndexMap, Member
from nasprune.graph.tracer import TraceError

__all__ = ["trace", "ChannelGraph", "ChannelGroup", "IndexMap", "Member", "TraceError"]
