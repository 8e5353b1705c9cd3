"""The DiracGAN study: which GAN training methods converge (Mescheder et al. 2018), through this library's optimisers.

    python python/dirac_study.py [--steps 1000] [--h 0.1] [--out runs/dirac_study]

The same as ``odegan study dirac``: writes table.md, table.json and trajectories.png (docs/RESULTS.md shows them).
"""

import sys

from odegan_kernels.study import main

if __name__ == "__main__":
    sys.exit(main())
