"""Moved to `fastdetr.measure.proxies` (the command: `fastdetr proxies`; the benchmarks' rows:
benchmarks/proxies.py); this name stays for old imports and `python -m fastdetr.proxies`."""
import sys

from .measure.proxies import (  # noqa: F401
    CONFIGURATIONS,
    DEFORMABLE_QUICK_STEP,
    DEFORMABLE_R50_STEP,
    DETR_R50_STEP,
    MATCHERS,
    MODELS,
    PHASES,
    QUICK_STEP,
    STEPS,
    StepProxies,
    StepShape,
    format_table,
    measure,
    step_proxies,
)


def main(argv: list[str] | None = None) -> int:
    """`fastdetr proxies ARGS`."""
    from .cli import main as cli_main

    return cli_main(["proxies", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
