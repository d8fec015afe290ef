"""The outbox relay: a separate process that publishes outbox rows to Kafka (see README.md).

    python relay.py --dsn DSN --bootstrap B --topic T [--batch-size 100] [--timeout 10] [--once]

Exit 0 with --once when no unpublished row is left; exit non-zero when publishing fails.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="outbox relay")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="seconds to wait for the broker to acknowledge a batch")
    parser.add_argument("--once", action="store_true",
                        help="stop when nothing is pending instead of polling forever")
    args = parser.parse_args(argv)
    raise NotImplementedError(
        f"relay: claim up to {args.batch_size} unpublished outbox rows, publish them to "
        f"{args.topic}, mark them published - one transaction per batch")


if __name__ == "__main__":
    sys.exit(main())
