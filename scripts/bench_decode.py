"""Worst-case record decoding: time per payload shape, and how long the event loop waits.

    .venv/bin/python scripts/bench_decode.py [--repeat N] [--json]

Times `decode_record` on the largest payloads Kinesis takes (1 MiB) in the shapes that cost the
decoder most (many small attributes, long lists, big number sets, deep nesting, long digit runs)
and on the hostile payloads of tests/unit/test_hostile_records.py. Then runs the applier's page
decoding (a worker thread) on the slowest shape while a ticker on the event loop measures the
longest gap between its ticks: what one record can hold the loop up for.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicatord.applier import decode_page  # noqa: E402
from replicatord.conflict import PUT, Version  # noqa: E402
from replicatord.records import MAX_RECORD_BYTES, RecordError, ReplicationRecord, decode_record, encode_record  # noqa: E402
from tests.unit.test_hostile_records import HOSTILE  # noqa: E402


def record(extra: dict[str, Any]) -> bytes:
    keys = {"PK": {"S": "k"}}
    image = {**keys, "last_update_timestamp": {"N": "1"}, "last_updater_region": {"S": "cn-north-1"}, **extra}
    return encode_record(ReplicationRecord("PUT", "user", keys, image, Version(Decimal(1), PUT, "cn-north-1"),
                                           "cn-north-1", "1", 1.0))


def fill(make: Any) -> bytes:
    """The largest payload of this shape under Kinesis' 1 MiB."""
    low, high = 1, 200_000
    while low < high:
        middle = (low + high + 1) // 2
        if len(record(make(middle))) <= MAX_RECORD_BYTES:
            low = middle
        else:
            high = middle - 1
    return record(make(low))


SHAPES = {
    "many small attributes": lambda n: {f"a{i}": {"N": str(i)} for i in range(n)},
    "long list of NULL": lambda n: {"l": {"L": [{"NULL": True}] * n}},
    "number set": lambda n: {"ns": {"NS": [str(i) for i in range(n)]}},
    "string set": lambda n: {"ss": {"SS": [f"s{i}" for i in range(n)]}},
    "maps 32 deep, repeated": lambda n: {f"m{i}": json.loads('{"M": {"a": ' * 31 + '{"S": "x"}' + "}}" * 31)
                                         for i in range(n // 20)},
    "one large string": lambda n: {"s": {"S": "x" * (n * 5)}},
    "one large binary": lambda n: {"b": {"B": b"\x01" * (n * 3)}},
}


def time_decode(payload: bytes, repeat: int) -> tuple[float, bool]:
    samples = []
    ok = True
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            decode_record(payload)
        except RecordError:
            ok = False
        samples.append(time.perf_counter() - started)
    return max(samples), ok


async def loop_gap_during(payloads: list[bytes]) -> tuple[float, float]:
    """Longest gap between 1 ms ticks on the loop while a page is decoded in the worker thread."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await asyncio.to_thread(decode_page, payloads, "user")
    elapsed = time.perf_counter() - started
    done.set()
    await tick
    return max(gaps), elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, make in SHAPES.items():
        payload = fill(make)
        worst, ok = time_decode(payload, args.repeat)
        rows.append({"payload": name, "bytes": len(payload), "worst_ms": worst * 1000, "decodes": ok})
    for name, payload in HOSTILE.items():
        worst, ok = time_decode(payload, args.repeat)
        rows.append({"payload": f"hostile: {name}", "bytes": len(payload), "worst_ms": worst * 1000, "decodes": ok})
    slowest = max(rows, key=lambda r: r["worst_ms"])
    heavy = fill(SHAPES["many small attributes"])
    gap_s, page_s = asyncio.run(loop_gap_during([heavy] * 5))
    summary = {
        "payloads": len(rows),
        "worst_decode_ms": slowest["worst_ms"],
        "worst_payload": slowest["payload"],
        "hostile_worst_ms": max(r["worst_ms"] for r in rows if r["payload"].startswith("hostile")),
        "median_ms": statistics.median(r["worst_ms"] for r in rows),
        "page_of_5_x_1MiB_s": page_s,
        "longest_event_loop_gap_ms": gap_s * 1000,
    }
    if args.json:
        print(json.dumps({"rows": rows, "summary": summary}, indent=2))
        return 0
    for r in rows:
        verdict = "decodes" if r["decodes"] else "refused"
        print(f"{r['payload']:<44} {r['bytes']:>9} B  {r['worst_ms']:8.1f} ms  {verdict}")
    print(f"\nworst: {summary['worst_decode_ms']:.1f} ms ({summary['worst_payload']}); worst hostile "
          f"{summary['hostile_worst_ms']:.1f} ms; a page of 5 x 1 MiB decoded in {page_s:.2f} s in the worker "
          f"thread while the event loop's longest gap was {summary['longest_event_loop_gap_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
