"""The seed stream of seedless resets, shared by `WorldModelEnv` and `WorldModelVectorEnv`: counter-based
(splitmix64), so that any number of rows draw their next seed in a few array operations (no generator per row).
NumPy only, like world_model_env.py.

``reset(seed=s)`` starts an env's (a row's) stream at ``stream_start(s)``; each seedless reset advances it by the
golden gamma and hands the top 31 bits of its mix to reset_fn: the n-th seed after reset(seed=s) is (the top bits
of) splitmix64's n-th output from mix(s), a pure function of (s, n). The scalar functions (Python ints) and the
array ones (uint64 arrays) compute the same values, so a batched env reproduces SyncVectorEnv-of-WorldModelEnv
trajectories, autoresets included.
"""
import numpy as np

_M64 = 2**64 - 1
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U = np.uint64
_U_GOLDEN, _U_MIX1, _U_MIX2, _U27, _U30, _U31, _U33 = _U(_GOLDEN), _U(_MIX1), _U(_MIX2), _U(27), _U(30), _U(31), _U(33)


def stream_start(seed: int) -> int:
    """The stream state of an env (row) after ``reset(seed=seed)``: splitmix64's mix of the seed."""
    z = int(seed) & _M64
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def stream_next(state: int) -> tuple[int, int]:
    """(next state, seed in [0, 2**31)) of a stream: the state advances by the golden gamma; the seed is the top
    31 bits of its mix (the mix's last xor-shift does not change them, so it is left out)."""
    state = (state + _GOLDEN) & _M64
    z = ((state ^ (state >> 30)) * _MIX1) & _M64
    return state, (((z ^ (z >> 27)) * _MIX2) & _M64) >> 33


def stream_starts(seeds: np.ndarray) -> np.ndarray:
    """stream_start of an int array (uint64 result)."""
    z = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    z = (z ^ (z >> _U30)) * _U_MIX1  # uint64 arrays wrap modulo 2**64 silently
    z = (z ^ (z >> _U27)) * _U_MIX2
    return z ^ (z >> _U31)


def stream_nexts(states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """stream_next of a uint64 array of states: (next states, int64 seeds). In place on a fresh copy: a few ops."""
    states = states + _U_GOLDEN
    z = states >> _U30
    z ^= states
    z *= _U_MIX1
    t = z >> _U27
    z ^= t
    z *= _U_MIX2
    z >>= _U33
    return states, z.view(np.int64)
