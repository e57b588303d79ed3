"""Orthogonal rotations for the `rotate` stage: a randomized Hadamard matrix of any size that
factors into powers of two and Paley orders (QuaRot, Ashkboos et al. 2024), else a seeded random
orthogonal matrix (SpinQuant's starting point, Liu et al. 2024).

A Hadamard matrix H (entries ±1, H Hᵀ = n I) spreads every coordinate over all of them, so an
outlier channel of the residual stream becomes n small ones; H / sqrt(n) with random signs on
its columns is orthogonal and seeded. Sizes: Sylvester's construction gives powers of two;
Paley's first construction gives q + 1 for a prime q ≡ 3 (mod 4) (12, 20, 24, 32, 44, 48, 60,
...); Kronecker products combine them, so SmolLM2's 576 = 12 · 48 and Llama's 4096 = 2¹² both
have one. Written here (a few lines of number theory) because torch has no Hadamard
constructor and the peers' tables (QuaRot's, fast-hadamard-transform) are CUDA-only builds.
"""

from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def paley(n: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order n = q + 1, q prime, q ≡ 3 (mod 4)."""
    q = n - 1
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"no Paley construction of order {n}")
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    jac = chi[idx]  # Jacobsthal matrix Q[i, j] = chi(j - i), antisymmetric for q ≡ 3 (mod 4)
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return s + torch.eye(n, dtype=torch.float64)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def factors(n: int) -> list[int] | None:
    """Orders whose Kronecker product is n: one power of two and Paley orders (None: none found)."""
    if n == 1:
        return []
    if n > 1 and n & (n - 1) == 0:
        return [n]
    for m in range(4, n + 1, 4):  # Hadamard orders are 1, 2 or multiples of 4
        if n % m or m & (m - 1) == 0 or not (_is_prime(m - 1) and (m - 1) % 4 == 3):
            continue
        rest = factors(n // m)
        if rest is not None:
            return [m] + rest
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (float64, entries ±1), or None where `factors` finds none."""
    parts = factors(n)
    if parts is None:
        return None
    h = torch.ones(1, 1, dtype=torch.float64)
    for m in parts:
        h = torch.kron(h, sylvester(m) if m & (m - 1) == 0 else paley(m))
    return h


def rotation(n: int, seed: int, kind: str = "hadamard") -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and what it is: a randomized Hadamard (random signs on
    the columns of H / sqrt(n)) where n has one and kind is 'hadamard', else a random orthogonal
    matrix (QR of a Gaussian, signs fixed), both seeded."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n) if kind == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
        return h * signs[None, :] / n ** 0.5, f"randomized Hadamard ({' x '.join(map(str, factors(n)))})"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random orthogonal"
