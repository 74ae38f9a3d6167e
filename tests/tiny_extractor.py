"""A small random conv net with the FeatureExtractor interface, for fast optimiser tests."""

import torch
from torch import Tensor, nn


class TinyExtractor(nn.Module):
    """Three conv+ReLU layers named like VGG's; identity pre-processing on the 0-255 scale."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        for p in self.parameters():
            p.requires_grad_(False)
            p.mul_(0.1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(nn.functional.avg_pool2d(a, 2)))
        c = torch.relu(self.conv3(nn.functional.avg_pool2d(b, 2)))
        return {"block1_conv1": a, "block2_conv1": b, "block3_conv1": c}

    def to_model(self, x01: Tensor) -> Tensor:
        return x01 * 255.0 - 127.5

    def from_model(self, y: Tensor) -> Tensor:
        return (y + 127.5) / 255.0

    def input_range(self) -> tuple[Tensor, Tensor]:
        return torch.full((3,), -127.5), torch.full((3,), 127.5)
