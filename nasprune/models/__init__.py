"""Models nasprune ships: CIFAR ResNets with option-A (zero-pad) or option-B (projection)
shortcuts, the pruned ResNet a TAS search derives (``TASResNet``, built by ``tas_resnet`` from an
architecture dict), and RepVGG (A0, A1, B0; ImageNet- and CIFAR-size) whose multi-branch blocks
``reparameterize`` folds into one 3x3 convolution each."""
from nasprune.models.cifar_resnet import (ChannelZeroPad, CifarResNet, cifar_resnet20, cifar_resnet32,
                                          cifar_resnet44, cifar_resnet56, cifar_resnet110,
                                          load_pretrained)
from nasprune.models.pruned_resnet import ResNetSpec, TASResNet, tas_resnet
from nasprune.models.repvgg import (RepVGG, RepVGGBlock, cifar_repvgg_a0, cifar_repvgg_a1, cifar_repvgg_b0,
                                    reparameterize, repvgg_a0, repvgg_a1, repvgg_b0)

__all__ = ["ChannelZeroPad", "CifarResNet", "RepVGG", "RepVGGBlock", "ResNetSpec", "TASResNet", "cifar_repvgg_a0",
           "cifar_repvgg_a1", "cifar_repvgg_b0", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
           "cifar_resnet56", "cifar_resnet110", "load_pretrained", "reparameterize", "repvgg_a0", "repvgg_a1",
           "repvgg_b0", "tas_resnet"]
