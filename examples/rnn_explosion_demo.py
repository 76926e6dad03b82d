"""The seed scenario: a vanilla tanh RNN whose gradients explode, trained twice and logged to MLflow.

Run 1 only monitors (``clip=None``): the gradients explode, the loss blows up, gradtrack judges the
run diverged and tags it ``diverged=true`` while it is still running. Run 2 is the same model, data
and optimizer with norm clipping at 5.0: it trains, and stays ``diverged=false``.

Both runs go to MLflow's default store (``sqlite:///mlflow.db`` in the working directory, or
``MLFLOW_TRACKING_URI``), each with its plots and a description saying what happened; the script
draws both runs' gradient norms in one picture (``gradtrack-demo.png``) and ends with the links that open
the MLflow UI on the answer: the runs (the diverged one red), the experiment's "gradtrack" saved view (the
diverged runs first, with their explosions and the norm charts), and the diverged runs alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from gradtrack import GradTracker

HIDDEN, SEQ_LEN, INPUTS, BATCH = 32, 100, 4, 16
RADIUS = 3.0  # recurrent spectral radius: far above 1, so gradients through 100 steps explode
LEARNING_RATE = 0.2
STEPS = 200
MAX_NORM = 5.0
SEED = 1


class VanillaRNN(nn.Module):
    """``h_t = tanh(W_h h_{t-1} + W_x x_t)`` with a linear readout of the last state."""

    def __init__(self, radius: float, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.W_x = nn.Linear(INPUTS, HIDDEN)
        self.W_h = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.readout = nn.Linear(HIDDEN, 1)
        with torch.no_grad():  # a random matrix rescaled to the requested spectral radius
            weight = torch.randn(HIDDEN, HIDDEN, generator=torch.Generator().manual_seed(seed))
            self.W_h.weight.copy_(weight * radius / torch.linalg.eigvals(weight).abs().max())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], HIDDEN)
        for t in range(x.shape[1]):
            h = torch.tanh(self.W_h(h) + self.W_x(x[:, t]))
        return self.readout(h).squeeze(-1)


def batches(count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A small synthetic task: recall a mix of the last two inputs after 100 steps of noise."""
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        x = torch.randn(BATCH, SEQ_LEN, INPUTS, generator=generator)
        data.append((x, x[:, -1, 0] + 0.5 * x[:, -2, 1]))
    return data


def train(name: str, **clipping: object) -> dict[str, object]:
    """Train one run on the MLflow backend; a monitor-only run stops once it is judged diverged."""
    model = VanillaRNN(RADIUS, SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    options = {"mlflow": {"experiment_name": "gradtrack-rnn-demo", "run_name": name}}
    started = time.perf_counter()
    recent: list[float] = []
    first_loss: float | None = None
    # close_timeout: the picture is drawn from what the runs logged, so wait for them to be complete even on a
    # busy machine (the default 10 s lets the reporter finish alone, after the script has read the runs)
    with GradTracker(model, backend="mlflow", backend_options=options, close_timeout=300.0, **clipping) as tracker:  # type: ignore[arg-type]
        for x, y in batches(STEPS, SEED + 1):
            optimizer.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            tracker.observe(loss=loss)
            optimizer.step()
            recent = [*recent[-19:], loss.item()]
            first_loss = first_loss if first_loss is not None else recent[0]
            if tracker.diverged:  # nothing more to learn from this run: stop paying for it
                break
    summary = tracker.summary()
    return {
        "run": name,
        "steps": summary.steps,
        "first loss": f"{first_loss:.4g}",
        "final loss (last 20)": f"{sum(recent) / len(recent):.4g}",
        "max norm": f"{summary.norm_max:.3g}" if summary.norm_max is not None else "n/a",
        "explosions": summary.explosions,
        "clipped steps": summary.clipped_steps,
        "diverged": f"{summary.diverged}" + (f" (step {summary.diverged_step})" if summary.diverged else ""),
        "seconds": f"{time.perf_counter() - started:.1f}",
    }


def print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    width = max(len(k) for k in keys)
    columns = [max(len(str(row[k])) for k in keys) for row in rows]
    for key in keys:
        cells = "  ".join(str(row[key]).ljust(w) for row, w in zip(rows, columns, strict=True))
        print(f"{key.ljust(width)}  {cells}")


def draw_comparison(uri: str, experiment_id: str, names: list[str], path: Path) -> Path:
    """Both runs' gradient norms in one picture, from what they logged."""
    from gradtrack_mlflow.cli import history_of
    from mlflow.tracking import MlflowClient

    from gradtrack.delivery.plots import compare_runs

    client = MlflowClient(uri)
    histories = {}
    for name in names:  # the latest run of each name
        (run,) = client.search_runs([experiment_id], f"attributes.run_name = '{name}'", max_results=1,
                                    order_by=["attributes.start_time DESC"])  # fmt: skip
        histories[name] = history_of(client, run)
    return compare_runs(histories, path, "vanilla RNN, spectral radius 3: monitor-only vs clipped at 5")


def main() -> None:
    from gradtrack_mlflow.links import diverged_link, runs_link, view_link

    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    rows = [train("monitor-only", clip=None), train("clip-norm-5", clip="norm", max_norm=MAX_NORM)]
    print()
    print_table(rows)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(uri).get_experiment_by_name("gradtrack-rnn-demo")
    assert experiment is not None, "both runs were logged to it"
    experiment_id = experiment.experiment_id
    picture = draw_comparison(uri, experiment_id, ["monitor-only", "clip-norm-5"], Path("gradtrack-demo.png"))
    print(f"\nBoth runs' gradient norms, drawn: {picture.absolute()}")
    print("\nBoth runs are in MLflow (experiment 'gradtrack-rnn-demo'), coloured by outcome; compare them with:")
    if not uri.startswith(("http://", "https://")):
        print(f"  mlflow ui --backend-store-uri {uri}")
    print(f"  open {runs_link(uri, experiment_id)}    # the runs: red diverged")
    print(f"  open {view_link(uri, experiment_id)}    # the gradtrack view")
    print(f"  open {diverged_link(uri, experiment_id)}    # only the diverged runs")
    print("or here: gradtrack runs --diverged, gradtrack report <run id>")


if __name__ == "__main__":
    main()
