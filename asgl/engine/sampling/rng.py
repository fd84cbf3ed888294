"""Counter-based randomness: a row's uniform is a pure function of (seed, output index).

`seed_key` runs on the host once per request (at admission); `counter_uniform` runs on the
device inside the sampler, with integer tensor ops and no generator state.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def seed_key(seed: int) -> int:
    """Two 32-bit keys from a 64-bit seed (splitmix64 finalizer), packed as a signed int64.

    Done on the host once per row: it keeps the device-side hash down to two rounds.
    """
    z = (seed + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit xorshift-multiply hash (constants from Wellons' hash prospector).

    x < 2**32 and both multipliers < 2**31, so no product reaches 2**63: exact in int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def counter_uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1) as float32 [S]: hash(key, step), one per row, on keys' device.

    `keys` are `seed_key(seed)` values, `steps` the output index being sampled.
    Two independent keys keep (key, step) pairs with equal `key ^ step` from colliding.
    """
    key_a = keys & _M32
    key_b = (keys >> 32) & _M32  # arithmetic shift, then mask: the high word unsigned
    h = _mix32(_mix32((steps & _M32) ^ key_a) ^ key_b)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))  # 24 bits: exact in float32
