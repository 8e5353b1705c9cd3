"""Explicit Butcher tableaus, and their compilation into the fused stage op's low-storage coefficients."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Tableau:
    """An explicit Butcher tableau. ``A[i]`` holds the weights of stages 0..i for stage point i+1."""

    name: str
    A: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int

    def __post_init__(self) -> None:
        coeffs = [*self.b, *(x for row in self.A for x in row)]
        if not self.b or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in coeffs):
            raise TypeError(f"tableau {self.name!r}: b and A must hold numbers (b at least one), got {self!r}")
        if not all(math.isfinite(x) for x in coeffs):
            raise ValueError(f"tableau {self.name!r}: every coefficient of A and b must be finite, got {self!r}")

    @property
    def stages(self) -> int:
        return len(self.b)

    def stability(self, z: complex) -> complex:
        """R(z): the factor one step multiplies an eigen-direction of y' = lambda*y by, z = h*lambda."""
        s = self.stages
        import numpy as np

        A = np.zeros((s, s), dtype=complex)
        for i, row in enumerate(self.A):
            A[i + 1, : len(row)] = row
        b = np.array(self.b, dtype=complex)
        return complex(1 + z * b @ np.linalg.solve(np.eye(s) - z * A, np.ones(s)))


TABLEAUS: dict[str, Tableau] = {
    t.name: t
    for t in (
        Tableau("euler", (), (1.0,), 1),
        Tableau("heun", ((1.0,),), (0.5, 0.5), 2),
        Tableau("midpoint", ((0.5,),), (0.0, 1.0), 2),
        Tableau("ralston", ((2 / 3,),), (0.25, 0.75), 2),
        Tableau("rk3", ((0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6), 3),
        Tableau("rk4", ((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6), 4),
    )
}


@dataclass(frozen=True)
class StageCoeffs:
    """Stage-op scalars for unit step size: the op gets (a, b, -h*c, -h*d, e)."""

    a: float
    b: float
    c: float
    d: float


def compile_tableau(tab: Tableau) -> list[StageCoeffs]:
    """Express a tableau as low-storage stages: acc = a*acc + b*k; point = x0 - h*(c*k + d*acc).

    acc after stage i is sum_{j<=i} b_j k_j, so stage point i+1 must weigh earlier stages in proportion
    to b (true of every tableau in TABLEAUS). Anything else raises ValueError.
    """
    s = tab.stages
    if len(tab.A) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(tab.A)):
        raise ValueError(f"tableau {tab.name!r}: A must have rows of length 1..{s - 1}")
    out = []
    for i in range(s):
        a = 0.0 if i == 0 else 1.0
        if i == s - 1:
            out.append(StageCoeffs(a, tab.b[i], 0.0, 1.0))
            continue
        row = tab.A[i]
        delta = None
        for j in range(i):
            if tab.b[j] != 0:
                ratio = row[j] / tab.b[j]
                if delta is None:
                    delta = ratio
                elif not math.isclose(delta, ratio, rel_tol=1e-12, abs_tol=1e-15):
                    raise ValueError(f"tableau {tab.name!r} is not expressible with two registers")
            elif row[j] != 0:
                raise ValueError(f"tableau {tab.name!r} is not expressible with two registers")
        delta = 0.0 if delta is None else delta
        out.append(StageCoeffs(a, tab.b[i], row[i] - delta * tab.b[i], delta))
    return out


def get_tableau(method: str | Tableau) -> Tableau:
    if isinstance(method, Tableau):
        return method
    if method not in TABLEAUS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(TABLEAUS)}")
    return TABLEAUS[method]


def stage_rows(stages: list[StageCoeffs], hs: list[float], last_e: dict[int, float]) -> list:
    """The stage op's scalars ``[stage][segment] = (a, b, c, d, e)`` for step sizes ``hs`` (one per segment);
    ``last_e[s]`` is segment s's weight of the after-step term r, added in the last stage."""
    last = len(stages) - 1
    rows = []
    for i, st in enumerate(stages):
        rows.append(
            [(st.a, st.b, -h * st.c, -h * st.d, last_e.get(s, 0.0) if i == last else 0.0) for s, h in enumerate(hs)]
        )
    return rows
