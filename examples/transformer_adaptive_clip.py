"""A small transformer language model with adaptive clipping and a console report.

The scenario: you do not know a good ``max_norm`` yet. ``clip="adaptive"`` clips at the 95th percentile
of the run's own recent healthy norms, and the summary tells you which fixed ``max_norm`` to use next time.
Runs in well under a minute on a CPU:  python examples/transformer_adaptive_clip.py
"""

from __future__ import annotations

import torch
from torch import nn

from gradtrack import GradTracker

VOCAB, WIDTH, CONTEXT = 64, 64, 32


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, nhead=4, dim_feedforward=128, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        return self.head(self.blocks(self.embed(tokens), mask=mask, is_causal=True))


def main(steps: int = 100) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.arange(CONTEXT + 1) % 7  # a periodic sequence the model can learn
    with GradTracker(
        model, backend="console", backend_options={"console": {"every": 50}}, clip="adaptive", max_norm=1.0
    ) as tracker:
        for _ in range(steps):
            offsets = torch.randint(0, VOCAB - 7, (16, 1))
            tokens = pattern + offsets
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            tracker.observe(loss)
            optimizer.step()
    summary = tracker.summary()
    print(
        f"clipped {summary.clipped_steps}/{summary.steps} steps; median norm {summary.norm_median:.3g}, "
        f"p95 {summary.norm_p95:.3g}; next time try max_norm={summary.recommended_max_norm:.2g}"
    )


if __name__ == "__main__":
    main()
