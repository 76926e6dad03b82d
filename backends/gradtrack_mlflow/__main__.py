"""``python -m gradtrack_mlflow replay <spool>``: send what a run left in its spool to MLflow."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence

from gradtrack.delivery.secrets import redact
from gradtrack_mlflow.spool import NotASpoolError, Spool
from gradtrack_mlflow.transport import Sink, is_permanent

__all__ = ["main", "replay"]


def replay(spool: Spool, tracking_uri: str | None = None, request_timeout: float = 30.0) -> tuple[int, int]:
    """Send every pending operation in order; return (sent, rejected). Raises on a transient failure,
    leaving the offset at the first unsent operation so the command can simply be run again."""
    spool.check()
    sink: Sink | None = None
    sent = rejected = 0
    for index, op in spool.pending():
        if sink is None:
            sink = Sink(tracking_uri or op["tracking_uri"], request_timeout)
        try:
            if op["op"] == "create_run":
                op["attempted"] = True  # whatever happened before, look for the run before creating one
            sink.execute(op)
            sent += 1
        except Exception as exc:
            if not is_permanent(exc):
                raise
            spool.reject(op, exc, sink.tracking_uri)
            rejected += 1
        spool.set_offset(index + 1)
    spool.clear()
    return sent, rejected


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradtrack_mlflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="send a spool left by a run to MLflow")
    replay_parser.add_argument("spool", help="the spool.jsonl file (or its directory) named in the warning")
    replay_parser.add_argument("--tracking-uri", help="send to this tracking URI instead of the recorded one")
    replay_parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request")
    args = parser.parse_args(argv)
    spool = Spool.at(args.spool)
    if not spool.path.exists():
        print(f"no spool at {spool.path}", file=sys.stderr)
        return 2
    try:
        sent, rejected = replay(spool, args.tracking_uri, args.request_timeout)
    except NotASpoolError as exc:
        print(f"refusing to replay: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        detail = redact(str(exc), [args.tracking_uri or ""])
        print(f"replay stopped at operation {spool.offset}: {detail}; run the command again", file=sys.stderr)
        return 1
    if rejected:
        print(f"sent {sent} operations; MLflow refused {rejected}, kept in {spool.rejected_path}")
        return 1
    shutil.rmtree(spool.directory, ignore_errors=True)
    print(f"sent {sent} operations from {spool.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
