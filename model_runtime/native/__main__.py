"""`python -m model_runtime.native` (also `chatglm-webdemo --build-kernels`): build our CPU kernels
now, at install or image-build time, so that no later start spends the compiler's time; prints
which code path each kernel takes on this machine. Exits 1 if a path this CPU has fails to build."""
from __future__ import annotations

import logging
import sys

from . import (ISAS, build_error, decode_attention_unavailable, first_isa, linear_unavailable, path_unavailable,
               prefill_attention_unavailable)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    runnable = [isa for isa in ISAS if path_unavailable(isa) is None]
    if not runnable:
        print(f"nothing to build: {build_error()}; torch's kernels run here")
        return 0
    error = build_error()
    if error:
        print(f"our CPU kernels {error}; torch's kernels run instead", file=sys.stderr)
        return 1
    for what, unavailable in [(f"linear, {bits}-bit weights", lambda isa, bits=bits: linear_unavailable(bits, isa))
                              for bits in (16, 8, 4)] + [("decode attention", decode_attention_unavailable),
                                                  ("prompt attention", prefill_attention_unavailable)]:
        isa, passed_over = first_isa(unavailable)
        print(f"{what}: {isa or 'torch'}" + (f" ({passed_over})" if passed_over else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
