import numpy as np
import pytest
import torch
from torch import nn

from anomaly_discovery.models.detectors.prn_training import AnomalySampler, EncodedSet, PRNTrainHooks, train_head

SIZE = 8
N_NORMAL = 8
N_ANOMALOUS = 5


class RecordingHead(nn.Module):
    """A one-parameter stand-in for PRNHead that records its parameter and which cached images each step saw
    (the cached maps hold the image's index: normal images 0…7, anomalies 100…104)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []
        self.biases: list[float] = []

    def forward(self, features, residuals, coarse):
        self.biases.append(self.bias.item())
        self.seen.append([int(v) for v in features[0][:, 0, 0, 0]])
        return self.bias + torch.zeros(features[0].shape[0], 1, SIZE, SIZE)


def encoded(values: list[int], defect: bool) -> EncodedSet:
    maps = [torch.tensor(values, dtype=torch.float16).view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE).clone()] * 4
    nearest = [torch.zeros(len(values), SIZE, SIZE, dtype=torch.long)] * 3
    return EncodedSet(maps, nearest, torch.full((len(values), 1, SIZE, SIZE), float(defect), dtype=torch.float16))


def train(head: RecordingHead, hooks: PRNTrainHooks | None = None, epochs: int = 2) -> list[float]:
    prototypes = [torch.zeros(1, 1)] * 3
    return train_head(head, encoded(list(range(N_NORMAL)), False), encoded(list(range(100, 100 + N_ANOMALOUS)), True),
                      prototypes, epochs=epochs, batch_size=4, steps_per_epoch=None, lr=1e-2, weight_decay=0.0,
                      device=torch.device("cpu"), progress=False, hooks=hooks)


def normal_seen(head: RecordingHead) -> list[list[int]]:
    return [[i for i in step if i < 100] for step in head.seen]


def test_each_batch_is_half_normal_half_cached_anomalies():
    head = RecordingHead()
    train(head, epochs=1)
    assert len(head.seen) == N_NORMAL // 2
    for step in head.seen:
        assert len(step) == 4 and sum(i < N_NORMAL for i in step) == 2 and all(100 <= i < 105 for i in step[2:])
    assert sorted(i for step in normal_seen(head) for i in step) == list(range(N_NORMAL))


def test_two_workers_share_each_epochs_normal_images_without_overlap():
    heads = [RecordingHead(), RecordingHead()]
    for rank, head in enumerate(heads):
        train(head, PRNTrainHooks(rank=rank, world_size=2), epochs=1)
    per_worker = [sorted(i for step in normal_seen(head) for i in step) for head in heads]
    assert [len(seen) for seen in per_worker] == [N_NORMAL // 2] * 2
    assert sorted(per_worker[0] + per_worker[1]) == list(range(N_NORMAL))


def test_resuming_from_an_epoch_state_continues_with_the_uninterrupted_batches_and_history():
    states, uninterrupted = [], RecordingHead()
    history = train(uninterrupted, PRNTrainHooks(on_epoch=lambda epoch, metrics, state: states.append(state)))
    resumed = RecordingHead()
    resumed_history = train(resumed, PRNTrainHooks(initial_state=states[0]))
    steps = len(uninterrupted.seen) // 2
    assert resumed.seen == uninterrupted.seen[steps:]
    assert resumed_history[0] == history[0] and len(resumed_history) == 2
    assert resumed.biases[0] == uninterrupted.biases[steps] != 0.0
    assert set(states[0]) == {"head", "optimizer", "scheduler", "history"}


def test_on_epoch_reports_the_loss_and_the_training_seconds_so_far():
    reports = []
    train(RecordingHead(), PRNTrainHooks(on_epoch=lambda epoch, metrics, state: reports.append((epoch, metrics))))
    assert [epoch for epoch, _ in reports] == [0, 1]
    assert all(set(metrics) == {"loss", "seconds"} for _, metrics in reports)
    assert 0.0 < reports[0][1]["seconds"] <= reports[1][1]["seconds"]


def test_the_anomaly_pool_draws_only_simulated_anomalies_without_real_ones():
    normals = np.full((3, 32, 32, 3), 120, np.uint8)
    sampler = AnomalySampler(normals, np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0, 32, 32), bool), None,
                             (0.2, 0.4, 0.4))
    images, masks, sources = sampler.pool(6)
    assert images.shape == (6, 32, 32, 3) and masks.shape == (6, 32, 32)
    assert set(sources) == {"simulated"} and masks.any(axis=(1, 2)).all()


def test_hooks_refuse_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank must be in"):
        PRNTrainHooks(rank=2, world_size=2)
