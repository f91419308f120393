"""Train a small ViT from scratch on sklearn's digits: BLAST layers (init="random") vs a dense ViT of
equal linear FLOPs. The BLAST paper's first use case: structured weights from the start.

    python examples/train_vit_digits.py
"""
from __future__ import annotations

import torch
from torch import nn

import blastfx


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        B, T, D = x.shape
        h = self.n1(x)
        q, k, v = (f(h).view(B, T, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D)
        x = x + self.o(a)
        return x + self.fc2(nn.functional.gelu(self.fc1(self.n2(x))))


class TinyViT(nn.Module):
    """8x8 digits -> 16 patches of 2x2 -> transformer -> 10 classes."""

    def __init__(self, dim=64, depth=2, heads=4, mlp=256):
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.pos = nn.Parameter(torch.zeros(1, 16, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp) for _ in range(depth)])
        self.head = nn.Linear(dim, 10)

    def forward(self, images):
        x = images.view(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(-1, 16, 4)
        x = self.embed(x) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean(1))


def digits(seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def linear_macs(model) -> int:
    return sum(m.num_parameters(include_bias=False) if isinstance(m, blastfx.BlastLinear) else m.weight.numel()
               for m in model.modules() if isinstance(m, (nn.Linear, blastfx.BlastLinear)))


def train(model, data, epochs=30, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    (X, y), (Xt, yt) = data
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((len(y) + 63) // 64))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return (model(Xt).argmax(-1) == yt).float().mean().item()


def build_pair(budget=0.5):
    """A BLAST ViT (random init, ``budget`` of its block linears) and a dense ViT of (about) equal
    linear MACs per token, found by shrinking the dense model's width."""
    torch.manual_seed(0)
    blast = blastfx.compress(TinyViT(), budget, config=blastfx.BlastConfig(init="random", progress=False),
                             example_inputs=torch.zeros(1, 8, 8))
    target = linear_macs(blast)
    dense = min((TinyViT(dim=d, mlp=4 * d) for d in range(16, 65, 4)), key=lambda m: abs(linear_macs(m) - target))
    return blast, dense


def main():
    data = digits()
    blast, dense = build_pair()
    print(blast.blastfx_plan.summary())
    for name, model in (("blast (init=random)", blast), ("dense, equal MACs", dense)):
        print(f"{name:20s} linear MACs/token {linear_macs(model):7d}  test accuracy {train(model, data):.3f}")


if __name__ == "__main__":
    main()
