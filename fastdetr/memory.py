"""Moved to `fastdetr.measure.saved_bytes` (the command: `fastdetr memory`); this name stays for old imports
and `python -m fastdetr.memory`."""
import sys

from .measure.saved_bytes import (  # noqa: F401
    CPU_DEFAULT,
    DETR_R50,
    KINDS,
    SMALL,
    LayerReport,
    LayerShape,
    SavedBytes,
    SavedStorage,
    format_table,
    gpu_dropout,
    layer_saved_bytes,
    saved_tensor_bytes,
)


def main(argv: list[str] | None = None) -> int:
    """`fastdetr memory ARGS`."""
    from .cli import main as cli_main

    return cli_main(["memory", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
