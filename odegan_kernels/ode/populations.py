"""A population's per-member settings as the stepper's per-segment ones: a step size per member (or per member and
player) as one per segment, and lambda per member (flat.PopulationParams lays the members out member-major)."""

from __future__ import annotations

from ..contract import check_reg


def per_segment(flat, h):
    """``h`` for a population as one value per segment: a number, one per member (len K: the member's D and G share
    it), or one per segment (len 2K, member-major); for one pair, ``h`` as given."""
    if flat.members == 1 and not hasattr(flat, "player_names") or not isinstance(h, (list, tuple)):
        return h
    k, p = flat.members, flat.nplayers
    if len(h) == k * p:
        return list(h)
    if len(h) == k:
        return [x for x in h for _ in range(p)]
    raise ValueError(f"h has {len(h)} step sizes for a population of {k} members: give one, {k} or {k * p}")


def member_regs(flat, reg) -> tuple[float, ...]:
    """lambda per member: one number for every member, or a list of ``flat.members`` numbers."""
    k = flat.members
    regs = list(reg) if isinstance(reg, (list, tuple)) else [reg] * k
    if len(regs) != k:
        raise ValueError(f"reg has {len(regs)} values for a population of {k} members: give one or {k}")
    return tuple(check_reg(r) for r in regs)
