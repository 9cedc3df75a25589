"""csrc/kernels/fast_divmod.h, the multiply-shift division the CUDA broadcast kernels use, against plain
integer division: compiled for the host with the same C++ compiler as the extension (its host path is the
device path with __umulhi written out)."""

import random
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = r"""
#include <cstdio>
#include "fast_divmod.h"
int main() {
  unsigned long long d, n;
  while (std::scanf("%llu %llu", &d, &n) == 2) {
    llkern::FastDivmod f(static_cast<uint32_t>(d));
    uint32_t q, r;
    f.divmod(static_cast<uint32_t>(n), q, r);
    std::printf("%u %u\n", q, r);
  }
}
"""


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs a C++ compiler")
def test_fast_divmod_equals_integer_division(tmp_path):
    source, binary = tmp_path / "t.cpp", tmp_path / "t"
    source.write_text(PROGRAM)
    subprocess.run(["c++", "-std=c++17", "-O2", f"-I{ROOT / 'csrc' / 'kernels'}", str(source), "-o", str(binary)],
                   check=True, timeout=120)
    rng = random.Random(5)
    top = 2**32 - 1
    divisors = [1, 2, 3, 7, 49, 64, 97, 1025, 3136, 2**16 + 1, 2**31 - 1, 2**31, 2**31 + 1, top]
    divisors += [rng.randint(1, top) for _ in range(300)] + [rng.randint(1, 5000) for _ in range(300)]
    pairs = []
    for d in divisors:
        numerators = {0, 1, d - 1, d, min(d + 1, top), top, top - 1, (top // d) * d, (top // d) * d - 1}
        numerators |= {rng.randint(0, top) for _ in range(30)}
        pairs += [(d, n) for n in sorted(numerators) if 0 <= n <= top]
    out = subprocess.run([str(binary)], input="".join(f"{d} {n}\n" for d, n in pairs), capture_output=True,
                         text=True, check=True, timeout=120).stdout.split()
    assert len(out) == 2 * len(pairs)
    for k, (d, n) in enumerate(pairs):
        assert (int(out[2 * k]), int(out[2 * k + 1])) == divmod(n, d), (d, n)
