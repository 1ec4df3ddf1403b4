"""`python -m scale_fast.backends.cpp --build`: build the compiled CPU kernels now, e.g. in a container
image, so that the first training run does not wait for the compiler.  Prints the library's path."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import _build


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale_fast.backends.cpp",
                                     description="Build the compiled CPU kernels (backend='cpp') into their cache.")
    parser.add_argument("--build", action="store_true", required=True, help="build now (nothing to do if built)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the build process of _build
    args = parser.parse_args(argv)
    if args.child:
        _build.run_as_child()
    try:
        path = _build.build_here() if args.child else _build.prebuild()
    except Exception as exc:  # noqa: BLE001 - reported in one line
        if args.child:  # read by the parent from stdout
            print(_build._short(exc), flush=True)
        else:
            print(f"scale_fast: could not build the C++ extension: {_build._short(exc)}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
