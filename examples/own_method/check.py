"""Check the SSF example (ssf.py, beside this file) with the shared gradient harness, as you would check
a method of your own:

    python examples/own_method/check.py            # every case in tinypeft.harness.DEFAULT_CASES
    python examples/own_method/check.py --quick    # the first case only

For each case (a small float64 model, every weight off its init, a batch with padding or not) it prints
every trainable tensor's error against autograd and against a central finite difference, the public
loss_and_grad's error against the engine, and the merged model's logits' error against the unmerged
model's; then whether its error cases raise what they say, and the worst of each. It exits 1 if any check
fails, naming the case, check and tensor.
docs/write_a_method.md explains each number.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import ssf` from any working directory

import ssf  # registers the method "ssf" as it is imported

from tinypeft.harness import DEFAULT_CASES, check_method
from tinypeft.methods.registry import method


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="check the first case only")
    args = parser.parse_args(argv)
    assert method("ssf") is ssf.SPEC  # registered by its one line
    cases = DEFAULT_CASES[:1] if args.quick else DEFAULT_CASES
    report = check_method("ssf", cases, raise_on_failure=False)
    print(report.table())
    print(
        f"\nworst over {len(cases)} case(s): autograd {report.max_error('autograd'):.2e}, "
        f"directional {report.max_error('directional'):.2e}, "
        f"loss_and_grad {report.max_error('loss_and_grad'):.2e}, merge {report.max_error('merge'):.2e}"
    )
    if not report.ok:
        print(f"FAILED: {len(report.failures)} check(s); see the lines starting with FAILED above", file=sys.stderr)
        return 1
    print("ok: hand = autograd = finite differences, engine = reference, merged = unmerged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
