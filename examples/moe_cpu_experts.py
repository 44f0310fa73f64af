"""A small MoE transformer whose experts run on the CPU through NumaExperts.

The attention, router and embeddings run wherever the model is (the GPU when
there is one); each block's experts live in node-local CPU memory, split over
the nodes of this process's CPUs. The script trains the model for a few
batches with Composer on a synthetic next-token task, then runs a greedy decode
loop (the case the split layout is built for: every token streams the weights
of its top-k experts once) and prints the layer's placement report.

    python examples/moe_cpu_experts.py                  # about a minute on two cores
    python examples/moe_cpu_experts.py --placement by-expert --steps 40
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from composer import Callback, Trainer
from composer.models import ComposerModel
from torch import nn
from torch.utils.data import DataLoader, Dataset

from composer_numa import NumaExperts


class MoEBlock(nn.Module):
    """Pre-norm causal self-attention, then a routed SwiGLU mixture of CPU experts."""

    def __init__(self, d: int, heads: int, experts: int, ffn: int, k: int, placement: str, dtype: torch.dtype):
        super().__init__()
        self.k, self.dtype = k, dtype
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = NumaExperts(experts, d, ffn, dtype=dtype, placement=placement)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, D = h.shape
        a = self.norm1(h)
        mask = torch.triu(torch.ones(S, S, dtype=torch.bool, device=h.device), 1)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        flat = self.norm2(h).reshape(B * S, D)
        ids, w = NumaExperts.route(self.router(flat), self.k)
        y = self.experts(flat.to(self.dtype), ids, w)  # x may be on the GPU: copied through pinned memory
        return h + y.to(h.dtype).reshape(B, S, D)


class TinyMoELM(ComposerModel):
    def __init__(self, vocab=64, d=128, layers=2, heads=4, experts=8, ffn=256, k=2, seq=32,
                 placement="split", dtype=torch.bfloat16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(MoEBlock(d, heads, experts, ffn, k, placement, dtype) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def forward(self, batch):
        return self.logits(batch[0])

    def loss(self, outputs, batch, *args, **kwargs):
        return F.cross_entropy(outputs.flatten(0, 1), batch[1].flatten())


class CountingSequences(Dataset):
    """Token t+1 = (token t + stride) mod vocab, with a per-sequence stride: learnable in a few steps."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.data = (start + stride * torch.arange(seq + 1)) % vocab

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


class LossLog(Callback):
    """Keeps the training loss of every batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def after_train_batch(self, state, logger) -> None:
        self.losses.append(float(state.loss))


@torch.no_grad()
def decode(model: TinyMoELM, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding, one token at a time (recomputing the short context)."""
    model.eval()
    out = prompt.clone()
    seq = model.pos.shape[0]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model.logits(out[:, -seq:])[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out, (time.perf_counter() - t0) / new_tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30, help="training batches")
    ap.add_argument("--placement", default="split", choices=["split", "by-expert", "replicate"])
    ap.add_argument("--decode", type=int, default=24, help="tokens to generate")
    args = ap.parse_args()
    torch.manual_seed(0)
    device = "gpu" if torch.cuda.is_available() else "cpu"
    vocab, seq = 64, 32
    model = TinyMoELM(vocab=vocab, seq=seq, placement=args.placement)
    loader = DataLoader(CountingSequences(64 * args.steps, seq, vocab), batch_size=16, shuffle=True)
    log = LossLog()
    trainer = Trainer(model=model, train_dataloader=loader, max_duration=f"{args.steps}ba", device=device,
                      optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3), callbacks=[log],
                      progress_bar=False, log_to_console=False, save_folder=None)
    t0 = time.perf_counter()
    trainer.fit()
    print(f"trained {args.steps} batches on {device} in {time.perf_counter() - t0:.1f} s: "
          f"loss {log.losses[0]:.3f} -> {log.losses[-1]:.3f}")

    dev = next(model.head.parameters()).device
    prompt = torch.tensor([[5, 7, 9, 11]], device=dev)  # stride 2
    out, per_token = decode(model, prompt, args.decode)
    print(f"decode: {out[0].tolist()}")
    print(f"decode: {per_token * 1e3:.2f} ms/token")
    print(model.blocks[0].experts.report(top_k=model.blocks[0].k))


if __name__ == "__main__":
    main()
