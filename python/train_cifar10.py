"""Train the reference ODE-GAN DCGAN on CIFAR-10 from a local copy (nothing is downloaded).

    python python/train_cifar10.py --data PATH [--set fid_real=PATH --set inception_weights=FILE] [...]

PATH is the folder holding cifar-10-batches-py. Any option of `odegan train` works here.
"""

import sys

from odegan_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "cifar10", *sys.argv[1:]]))
