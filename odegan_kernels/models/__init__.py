"""Generator/discriminator pairs: the toy MLPs, the CIFAR-10 DCGAN of the reference code, the CIFAR-10
ResNet, and the class-conditional ResNet for ImageNet."""

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .dirac import DiracDiscriminator, DiracGenerator, dirac_pair
from .init import truncated_normal_init_
from .mlp import MLP, mog_pair
from .resnet import ResNetDiscriminator, ResNetGenerator
from .resnet128 import ConditionalResNetDiscriminator, ConditionalResNetGenerator

__all__ = [
    "MLP",
    "mog_pair",
    "DCGANGenerator",
    "DCGANDiscriminator",
    "truncated_normal_init_",
    "DiracDiscriminator",
    "DiracGenerator",
    "dirac_pair",
    "ResNetGenerator",
    "ResNetDiscriminator",
    "ConditionalResNetGenerator",
    "ConditionalResNetDiscriminator",
]
