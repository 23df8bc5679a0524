"""The flags of `replicatord load`, apart from the loader itself.

The CLI builds every subcommand's parser at start-up, including on production hosts that
installed replicatord without the `local` extra. The loader (`load.py`) needs faker, which only
that extra provides, so its flags live here, in a module that imports nothing beyond argparse.
"""

from __future__ import annotations

import argparse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the load options; the short flags are those of the original load_items.py."""
    parser.add_argument(
        "-n", "--count", type=_non_negative_int, default=100, help="number of items to write (default 100)"
    )
    parser.add_argument("-t", "--table", required=True, help="DynamoDB table to load")
    parser.add_argument("-r", "--region", required=True, help="region of the table, e.g. cn-north-1")
    parser.add_argument(
        "-b",
        "--batched",
        action="store_true",
        help="write with BatchWriteItem instead of one PutItem per item",
    )
    parser.add_argument(
        "--processes", type=_positive_int, default=1, metavar="N", help="worker processes (default 1)"
    )
    parser.add_argument("--endpoint-url", default=None, help="DynamoDB endpoint (emulator or VPC endpoint)")
    parser.add_argument(
        "--loader-stats-table",
        default="loader_stats",
        help="table whose item PK=loaded_count counts the items written (default loader_stats)",
    )
