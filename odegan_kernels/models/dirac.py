"""DiracGAN (Mescheder et al. 2018): real data at 0, G a single point theta, D(x) = psi * x.

Near its equilibrium (0, 0) the game's field is a rotation (frequency f'(0) = 1/2 for the standard
losses), so every integrator claim can be checked against closed-form dynamics.
"""

import torch
from torch import nn


class DiracDiscriminator(nn.Module):
    def __init__(self, psi: float = 1.0) -> None:
        super().__init__()
        self.psi = nn.Parameter(torch.tensor([psi]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.psi).reshape(-1)


class DiracGenerator(nn.Module):
    def __init__(self, theta: float = 1.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([theta]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(z.shape[0], 1)


def dirac_pair(psi: float = 1.0, theta: float = 1.0, dtype=torch.float32):
    return DiracDiscriminator(psi).to(dtype), DiracGenerator(theta).to(dtype)
