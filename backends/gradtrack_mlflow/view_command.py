"""``gradtrack view EXPERIMENT``: the "gradtrack" saved view on an experiment gradtrack did not create.

Experiments gradtrack creates get the view when they are created (by the reporter process, where the MLflow
backend runs); a user's own experiment gets it on request, with this command, which writes one experiment tag
(:mod:`gradtrack_mlflow.view`) and prints the links that open on it. It refuses where the UI that shows the
experiment is an MLflow whose saved-view format was not verified, and will not replace a "gradtrack" view
that differs from gradtrack's (edited in the UI) without ``--replace``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from gradtrack.delivery.secrets import redact
from gradtrack_mlflow.links import diverged_link, view_link
from gradtrack_mlflow.view import VERIFIED_VERSIONS, VIEW_TAG, read_view, ui_version, view_supported, view_tag_value

__all__ = ["add_parser"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def add_parser(commands: Any) -> None:
    view = commands.add_parser(
        "view",
        help='add the "gradtrack" saved view to an experiment of yours and print its links',
        description='Add the "gradtrack" saved view (the diverged runs first; the columns diverged, '
        "gradtrack.explosions, gradtrack.rollbacks, grad/total_norm, loss; the charts grad/total_norm on a log "
        "scale, loss, grad/clip_coef) to an experiment, and print the links to it and to the diverged runs. "
        "Experiments gradtrack creates have it already. Exit code 0; 1 when the MLflow UI's version is not one "
        "whose view format is known, or the experiment has a different 'gradtrack' view (see --replace); 2 "
        "when the server cannot be read or the experiment does not exist.",
    )
    view.add_argument("experiment", help="the experiment's name (or its numeric id)")
    view.add_argument("--tracking-uri", help="the MLflow tracking URI (default: MLflow's own configuration)")
    view.add_argument("--replace", action="store_true", help="replace a 'gradtrack' view that was edited since")
    view.set_defaults(handler=_view)


def _view(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient, get_tracking_uri

    uri = args.tracking_uri or get_tracking_uri()
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(args.experiment)
        if experiment is None and args.experiment.isdigit():
            experiment = client.get_experiment(args.experiment)
        version = ui_version(uri)
    except Exception as exc:
        print(f"cannot read experiment {args.experiment!r}: {redact(str(exc), [uri])}", file=sys.stderr)
        return EXIT_USAGE
    if experiment is None:
        print(f"no such experiment: {args.experiment}", file=sys.stderr)
        return EXIT_USAGE
    if not view_supported(version):
        first, last = VERIFIED_VERSIONS
        print(f"the MLflow UI here is {version or 'of an unknown version'}; gradtrack writes its saved view only "
              f"for MLflow {first[0]}.{first[1]} up to (not including) {last[0]}.{last[1]}, whose format it "
              "knows", file=sys.stderr)  # fmt: skip
        return EXIT_REFUSED
    existing = experiment.tags.get(VIEW_TAG)
    if existing is not None and not args.replace and not _is_gradtracks(existing):
        print(f"experiment {experiment.name!r} has a 'gradtrack' view that differs from gradtrack's (edited in the "
              "UI?); --replace overwrites it", file=sys.stderr)  # fmt: skip
        return EXIT_REFUSED
    client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, view_tag_value(int(time.time() * 1000)))
    print(f"the gradtrack view:  {view_link(uri, experiment.experiment_id)}")
    print(f"the diverged runs:   {diverged_link(uri, experiment.experiment_id)}")
    return EXIT_OK


def _is_gradtracks(value: str) -> bool:
    """Whether a saved view holds the state gradtrack writes (rewriting it then changes nothing the user did)."""
    try:
        return read_view(value)["state"] == read_view(view_tag_value(0))["state"]
    except ValueError:
        return False
