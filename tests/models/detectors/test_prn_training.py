import numpy as np
import pytest
import torch
from torch import nn

from anomaly_discovery.models.detectors.prn_training import AnomalySampler, PRNTrainHooks, train_head

SIZE = 32
N_NORMAL = 8


class RecordingHead(nn.Module):
    """A one-parameter stand-in for PRNHead that records its parameter and which cached normal maps (their value
    is the image's index; generated anomalies are -1) each training step saw."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []
        self.biases: list[float] = []

    def forward(self, features, residuals, coarse):
        self.biases.append(self.bias.item())
        self.seen.append([int(v) for v in features[0][:, 0, 0, 0] if v >= 0])
        return self.bias + torch.zeros(features[0].shape[0], 1, SIZE, SIZE)


def train(head: RecordingHead, hooks: PRNTrainHooks | None = None, epochs: int = 2) -> list[float]:
    normal_maps = [torch.arange(N_NORMAL, dtype=torch.float32).view(-1, 1, 1, 1)] * 4
    sampler = AnomalySampler(np.full((N_NORMAL, SIZE, SIZE, 3), 120, np.uint8), np.zeros((0, SIZE, SIZE, 3), np.uint8),
                             np.zeros((0, SIZE, SIZE), bool), None, (0.0, 0.0, 1.0))

    def encode(images: np.ndarray) -> list[torch.Tensor]:
        return [torch.full((len(images), 1, 1, 1), -1.0)] * 4

    return train_head(head, normal_maps, [torch.zeros(1, 1, 1, 1)] * 3, sampler, encode, epochs=epochs,
                      batch_size=4, steps_per_epoch=None, lr=1e-2, weight_decay=0.0, device=torch.device("cpu"),
                      progress=False, hooks=hooks)


def test_two_workers_share_each_epochs_normal_images_without_overlap():
    heads = [RecordingHead(), RecordingHead()]
    for rank, head in enumerate(heads):
        train(head, PRNTrainHooks(rank=rank, world_size=2), epochs=1)
    per_worker = [sorted(i for step in head.seen for i in step) for head in heads]
    assert [len(seen) for seen in per_worker] == [N_NORMAL // 2] * 2
    assert sorted(per_worker[0] + per_worker[1]) == list(range(N_NORMAL))


def test_resuming_from_an_epoch_state_continues_with_the_uninterrupted_order_and_history():
    states, uninterrupted = [], RecordingHead()
    history = train(uninterrupted, PRNTrainHooks(on_epoch=lambda epoch, metrics, state: states.append(state)))
    resumed = RecordingHead()
    resumed_history = train(resumed, PRNTrainHooks(initial_state=states[0]))
    steps = len(uninterrupted.seen) // 2
    assert resumed.seen == uninterrupted.seen[steps:]
    assert resumed_history[0] == history[0] and len(resumed_history) == 2
    assert resumed.biases[0] == uninterrupted.biases[steps] != 0.0


def test_hooks_refuse_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank must be in"):
        PRNTrainHooks(rank=2, world_size=2)
