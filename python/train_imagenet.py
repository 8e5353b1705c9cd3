"""Train a class-conditional ODE-GAN on ImageNet at 128x128 (SN-GAN's projection ResNet, no spectral norm).

    python python/train_imagenet.py --data PATH/TO/imagenet/train [...]

PATH is an ImageFolder tree (one folder per class, as ImageNet's train/ is laid out); nothing is
downloaded. The preset is `imagenet128`: joint RK4 with a fresh batch (and fresh labels) per stage, the
penalty in stage 1, the CIFAR-10 code's h and lambda (the authors published no ImageNet code).
`--set image_size=64` trains at 64x64, `--set width=32` halves every layer's width, `--set cuda_graph=true`
captures the whole step. Any option of `odegan train` works here.
"""

import sys

from odegan_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "imagenet128", *sys.argv[1:]]))
