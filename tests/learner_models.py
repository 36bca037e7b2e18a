"""Three models as learners of the course write them, for the tests that add them to model.py: written-out
S7 blocks, a conv net with functional pooling that ends in x.view and a linear layer, and the course's
starter Net (renamed). Below the imports, this file is appended to a copy of model.py as it is."""

import torch.nn.functional as F
from torch import nn

# --- appended to model.py from here ---


class S7Net(nn.Module):
    """Blocks written out as the S7 notebooks do: no padding, a 1x1 transition, GAP as a 6x6 average."""

    def __init__(self):
        super().__init__()
        dropout = 0.05

        def block(cin, cout, padding=0):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=padding, bias=False), nn.ReLU(),
                                 nn.BatchNorm2d(cout), nn.Dropout(dropout))

        self.convblock1 = block(1, 8)                                # 26x26, RF 3
        self.convblock2 = block(8, 16)                               # 24x24, RF 5
        self.transition = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False))
        self.pool1 = nn.MaxPool2d(2, 2)                              # 12x12, RF 6
        self.convblock3 = block(8, 12)                               # 10x10, RF 10
        self.convblock4 = block(12, 12)                              # 8x8, RF 14
        self.convblock5 = block(12, 12)                              # 6x6, RF 18
        self.convblock6 = block(12, 16, padding=1)                   # 6x6, RF 22
        self.gap = nn.Sequential(nn.AvgPool2d(kernel_size=6))
        self.convblock7 = nn.Sequential(nn.Conv2d(16, 10, 1, bias=False))

    def forward(self, x):
        x = self.pool1(self.transition(self.convblock2(self.convblock1(x))))
        x = self.convblock6(self.convblock5(self.convblock4(self.convblock3(x))))
        x = self.convblock7(self.gap(x))
        x = x.view(-1, 10)
        return F.log_softmax(x, dim=-1)


class LinearNet(nn.Module):
    """Functional pooling and ReLU, then x.view and a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.dropout = nn.Dropout(0.1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = self.dropout(x)
        x = x.view(x.size(0), -1)
        return F.log_softmax(self.fc(x), dim=1)


class StarterNet(nn.Module):
    """The course's starter Net, as handed out (renamed): 6.3 million parameters, no BatchNorm."""

    def __init__(self):
        super(StarterNet, self).__init__()  # noqa: UP008 (as handed out)
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.conv4 = nn.Conv2d(128, 256, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv5 = nn.Conv2d(256, 512, 3)
        self.conv6 = nn.Conv2d(512, 1024, 3)
        self.conv7 = nn.Conv2d(1024, 10, 3)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv2(F.relu(self.conv1(x)))))
        x = self.pool2(F.relu(self.conv4(F.relu(self.conv3(x)))))
        x = F.relu(self.conv6(F.relu(self.conv5(x))))
        x = F.relu(self.conv7(x))
        x = x.view(-1, 10)
        return F.log_softmax(x, dim=1)
