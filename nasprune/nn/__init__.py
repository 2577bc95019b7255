"""Drop-in torch layers backed by the nasprune ops."""
from nasprune.nn import gates  # noqa: F401
from nasprune.nn.gated_conv import GatedConv2d, GatedConvBNAct2d  # noqa: F401
