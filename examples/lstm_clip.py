"""The seed's second model: a 2-layer LSTM on 100-step sequences, clipped at the global norm 1.0.

"Training with clipping for RNN/LSTM is standard practice": gradtrack does the clipping the seed
wrote by hand (``clip_grad_norm_(lstm.parameters(), max_norm=1.0)``), and tells how often it bit, which
layers offend, and what ``max_norm`` the healthy steps suggest. Runs in well under a minute on a CPU:

    python examples/lstm_clip.py
"""

from __future__ import annotations

import torch
from torch import nn

from gradtrack import GradTracker


class Reader(nn.Module):
    """The seed's LSTM, with a readout: the task is to report a sum of early inputs at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=10, hidden_size=32, num_layers=2, batch_first=True)
        self.readout = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(x)
        return self.readout(h_n[-1]).squeeze(-1)


def main(steps: int = 60) -> None:
    torch.manual_seed(0)
    model = Reader()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.MSELoss()
    console = {"console": {"every": 20}}
    with GradTracker(model, backend="console", backend_options=console, clip="norm", max_norm=1.0) as tracker:
        for _ in range(steps):
            x = torch.randn(32, 100, 10)  # (batch, seq_len=100, input_size)
            y = x[:, :5, 0].sum(1)  # what the first five steps said: a long-range dependency
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            tracker.observe(loss)
            optimizer.step()
    summary = tracker.summary()
    print(
        f"clipped {summary.clipped_steps}/{summary.steps} steps at max_norm=1.0; median norm "
        f"{summary.norm_median:.3g}, p95 {summary.norm_p95:.3g}; "
        f"next time try max_norm={summary.recommended_max_norm:.2g}"
    )


if __name__ == "__main__":
    main()
