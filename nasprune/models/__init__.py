"""Models nasprune ships: CIFAR ResNets with option-A (zero-pad) or option-B (projection)
shortcuts."""
from nasprune.models.cifar_resnet import (ChannelZeroPad, CifarResNet, cifar_resnet20, cifar_resnet32,
                                          cifar_resnet44, cifar_resnet56, cifar_resnet110,
                                          load_pretrained)

__all__ = ["ChannelZeroPad", "CifarResNet", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
           "cifar_resnet56", "cifar_resnet110", "load_pretrained"]
