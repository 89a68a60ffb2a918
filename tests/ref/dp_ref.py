#!/usr/bin/env python3
"""Independent reference for the DP accountant (tests/test_dp.c), in mpmath at 60 digits:

- RDP of the Poisson-subsampled Gaussian at integer orders (Mironov, Talwar, Zhang 2019,
  Sec. 3.3), summed directly: A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 z^2)),
  rdp = log(A_a) / (a - 1);
- its (epsilon, delta) conversion (Balle et al. 2020, Thm 21) over the same orders;
- the exact privacy profile of the Gaussian mechanism (Balle & Wang 2018, analytic
  Gaussian): R rounds at noise z compose to one Gaussian with mu = sqrt(R)/z, and
  delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), solved for eps;
- the noise multiplier for a target epsilon, by bisection on this reference.

Usage: dp_ref.py OUT_DIR  (writes OUT_DIR/dp_ref.txt, one case per line)"""
import os
import sys

from mpmath import mp, mpf, exp, log, sqrt, erfc

mp.dps = 60
ORDERS = list(range(2, 101)) + list(range(110, 201, 10)) + [256, 320, 384, 512, 640, 768, 896, 1024]


def rdp(q, z, a):
    q, z = mpf(q), mpf(z)
    if q == 1:
        return mpf(a) / (2 * z * z)
    # term_k = C(a,k) (1-q)^(a-k) q^k E^(k(k-1)/2) with E = exp(1/z^2), term by term
    e1, r = exp(1 / (z * z)), q / (1 - q)
    t = (1 - q) ** a
    s, g = t, mpf(1)
    for k in range(1, a + 1):
        t = t * (a - k + 1) / k * r * g  # g = E^(k-1)
        g *= e1
        s += t
    return log(s) / (a - 1)


def eps_from_rdp(rdps, delta):
    delta = mpf(delta)
    best = None
    for a, r in zip(ORDERS, rdps):
        e = r + log(mpf(a - 1) / a) - (log(delta) + log(mpf(a))) / (a - 1)
        best = e if best is None or e < best else best
    return max(best, mpf(0))


def eps_rdp(q, z, rounds, delta):
    return eps_from_rdp([rounds * rdp(q, z, a) for a in ORDERS], delta)


def phi(x):
    return erfc(-x / sqrt(2)) / 2


def eps_exact_gaussian(z, rounds, delta):
    mu = sqrt(mpf(rounds)) / mpf(z)

    def d(e):
        return phi(-e / mu + mu / 2) - exp(e) * phi(-e / mu - mu / 2)

    lo, hi = mpf(0), mpf(1)
    while d(hi) > delta:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if d(mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def find_noise(q, rounds, eps, delta):
    lo, hi = mpf("0.01"), mpf(10000)
    for _ in range(36):  # (1e6)^(2^-36): 2e-10 relative
        mid = sqrt(lo * hi)
        if eps_rdp(q, mid, rounds, delta) <= eps:
            hi = mid
        else:
            lo = mid
    return hi


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    lines = []
    for q in ["0.001", "0.01", "0.1", "0.5", "1"]:
        for z in ["0.5", "0.8", "1", "2", "5", "20"]:
            for a in [2, 3, 5, 8, 16, 32, 64, 128, 256, 1024]:
                lines.append("rdp %s %s %d %s" % (q, z, a, mp.nstr(rdp(q, z, a), 25)))
    mp.dps = 25  # the conversions sum many orders: 25 digits are plenty
    for q, z, rounds, delta in [("0.01", "1.1", 100, "1e-5"), ("0.01", "0.8", 1000, "1e-5"),
                                ("0.1", "2", 50, "1e-6"), ("0.001", "5", 10000, "1e-5"),
                                ("1", "3", 10, "1e-5"), ("0.05", "1", 1, "1e-5")]:
        lines.append("eps %s %s %d %s %s" % (q, z, rounds, delta, mp.nstr(eps_rdp(q, z, rounds, delta), 20)))
    for z, rounds, delta in [("1", 1, "1e-5"), ("2", 10, "1e-5"), ("5", 100, "1e-5"), ("10", 1000, "1e-6"),
                             ("20", 100, "1e-5"), ("0.8", 1, "1e-3")]:
        lines.append("exact %s %d %s %s %s" % (z, rounds, delta, mp.nstr(eps_exact_gaussian(z, rounds, mpf(delta)), 20),
                                                mp.nstr(eps_rdp("1", z, rounds, delta), 20)))
    for eps in ["1", "4", "8"]:
        lines.append("noise 0.01 100 %s 1e-5 %s" % (eps, mp.nstr(find_noise("0.01", 100, mpf(eps), mpf("1e-5")), 20)))
    with open(os.path.join(out, "dp_ref.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
