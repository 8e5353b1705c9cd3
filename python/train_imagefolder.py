"""Train the reference ODE-GAN DCGAN at 32x32 on any ImageFolder tree (ImageNet's train/ folder included).

    python python/train_imagefolder.py --data PATH [...]

Any option of `odegan train` works here. For class-conditional 128x128 training use train_imagenet.py.
"""

import sys

from odegan_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "imagefolder", *sys.argv[1:]]))
