"""Polar Express coefficients for Muon's Newton-Schulz step (Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932).

Muon orthogonalizes an update G by iterating X <- a X + b (X X^T) X + c (X X^T)^2 X, an odd quintic p(x) = a x + b x^3 +
c x^5 applied to every singular value of X = G / ||G||_F (all in (0, 1]). The fixed quintic of modded-nanogpt
(3.4445, -4.7750, 2.0315) uses the same p at every step. Polar Express picks, at step t, the odd quintic that is
minimax-optimal on the interval [l_t, u_t] the singular values are known to lie in: minimize max |1 - p(x)| over
[l_t, u_t]; the next interval is p's range there, [1 - E_t, 1 + E_t] (E_t the error reached). Greedy, and by the
paper's theorem optimal among compositions of such polynomials.

Each step's polynomial is found by the Remez exchange algorithm: the best odd quintic error equioscillates at four
points of [l, u] (l, two interior extrema of p, u: Chebyshev's alternation theorem for 3 coefficients); solving
p(x_i) + (-1)^i E = 1 at the four points and moving them to the new extrema converges in a few rounds.
In bf16, rounding pushes some singular values slightly past an interval's top, where the next polynomials grow
fast: designed on the exact intervals, a singular value of a random 128 x 128 bf16 update reached 93 after five
steps. So each step is designed on [l_t, TOP_CUSHION * u_t] (1.05: values up to 5% over the top are inside) and
divided by SAFETY (1.01, the paper's safety factor); measured on 20 random bf16 matrices (singular values 1 down to
3e-3) every singular value then ends in [0.74, 1.17] (the fixed quintic: [0.68, 1.20], small ones at 0.19).

    python tools/polar_express.py            # prints the coefficients train_gpt.POLAR_EXPRESS_COEFFICIENTS holds
"""
import sys

import numpy as np

LOWER_BOUND = 1e-3  # smallest singular value of G / ||G||_F the iteration is designed for
STEPS = 5
SAFETY = 1.01
TOP_CUSHION = 1.05


def quintic(coefficients, x):
    a, b, c = coefficients
    return a * x + b * x ** 3 + c * x ** 5


def extrema(coefficients, lower, upper):
    """Points of [lower, upper] where |1 - p| can peak: the ends and the zeros of p'(x) = a + 3 b x^2 + 5 c x^4."""
    a, b, c = coefficients
    roots = np.roots([5 * c, 3 * b, a]) if c != 0 else np.array([-a / (3 * b)]) if b != 0 else np.array([])
    inner = sorted(float(np.sqrt(r.real)) for r in roots if abs(r.imag) < 1e-12 and r.real > 0
                   and lower < np.sqrt(r.real) < upper)
    return [lower, *inner, upper]


def minimax_quintic(lower, upper, rounds=100):
    """(a, b, c, E): the odd quintic minimizing max |1 - p| on [lower, upper], by Remez exchange."""
    points = list(np.geomspace(lower, upper, 4))
    for _ in range(rounds):
        signs = np.array([(-1) ** i for i in range(4)], dtype=float)
        matrix = np.array([[x, x ** 3, x ** 5, s] for x, s in zip(points, signs)])
        a, b, c, error = np.linalg.solve(matrix, np.ones(4))
        candidates = extrema((a, b, c), lower, upper)
        if len(candidates) != 4:
            break
        if np.allclose(candidates, points, rtol=1e-13, atol=0):
            break
        points = candidates
    return (a, b, c), abs(error)


def polar_express(lower=LOWER_BOUND, steps=STEPS, safety=SAFETY, cushion=TOP_CUSHION):
    """The per-step coefficients (each designed on [l, cushion * u], divided by `safety`); returns [(a, b, c)] as
    floats and the final interval."""
    coefficients, low, high = [], lower, 1.0
    for _ in range(steps):
        (a, b, c), error = minimax_quintic(low, cushion * high)
        values = [quintic((a, b, c), x) for x in extrema((a, b, c), low, cushion * high)]
        low, high = min(values) / safety, max(values) / safety
        coefficients.append((float(a / safety), float(b / safety), float(c / safety)))
    return coefficients, (low, high)


def main():
    coefficients, (low, high) = polar_express()
    for a, b, c in coefficients:
        print(f"    ({a!r}, {b!r}, {c!r}),")
    print(f"# singular values in [{LOWER_BOUND}, 1] end in [{low:.6f}, {high:.6f}] after {STEPS} steps", file=sys.stderr)


if __name__ == "__main__":
    main()
