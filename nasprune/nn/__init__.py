"""Drop-in torch layers backed by the nasprune ops."""
from nasprune.nn import gates  # noqa: F401
from nasprune.nn.gate import ChannelGate, apply_gate  # noqa: F401
from nasprune.nn.gated_conv import GatedConv2d, GatedConvBNAct2d  # noqa: F401
from nasprune.nn.select import ChannelSelect  # noqa: F401
from nasprune.nn import handlers  # noqa: F401,E402  (registers the layers' pruning handlers)
