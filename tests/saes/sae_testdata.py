"""Synthetic activation sources for the SAE tests (no model needed)."""

from __future__ import annotations

import torch


class SyntheticSource:
    """Sparse combinations of a fixed random dictionary plus an offset, as an iterable with a
    resumable position (``state_dict`` / ``load_state_dict``), like the activation store."""

    def __init__(self, d_model: int = 16, n_atoms: int = 64, rows: int = 128, seed: int = 0,
                 sites: tuple[str, ...] | None = None, density: float = 0.06):
        g = torch.Generator().manual_seed(seed)
        self.dic = torch.randn(n_atoms, d_model, generator=g)
        self.offset = torch.randn(d_model, generator=g)
        self.rows, self.seed, self.sites, self.density = rows, seed, sites, density
        self.position = 0
        self.d_model = d_model

    def batch(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + i)
        z = (torch.rand(self.rows, self.dic.shape[0], generator=g) < self.density).float()
        z = z * torch.rand(self.rows, self.dic.shape[0], generator=g) * 2
        x = z @ self.dic + self.offset
        if self.sites is None:
            return x
        return {s: x * (j + 1) for j, s in enumerate(self.sites)}

    def __iter__(self):
        while True:
            b = self.batch(self.position)
            self.position += 1
            yield b

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, d: dict) -> None:
        self.position = int(d["position"])
