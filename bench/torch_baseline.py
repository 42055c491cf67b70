"""PyTorch reference throughput for docs/benchmarks.md: the bench model of issue 2 in plain torch.

8 layers, hidden 512, GQA 8/4 heads (head_dim 64), intermediate 1408, vocab 8192, batch 4 x 256 tokens,
fp32 frozen base, LoRA r=16 on all 7 linear targets, torch.utils.checkpoint per layer, 2 threads.
Prints one JSON object. Needs Debian's python3-torch (not needed by the test suite).
"""
import json, math, resource, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)
L, C, H, KV, D, I, V, B, S, R = 8, 512, 8, 4, 64, 1408, 8192, 4, 256, 16

class LoraLinear(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.base = nn.Linear(i, o, bias=False); self.base.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(R, i) / math.sqrt(i)); self.B = nn.Parameter(torch.randn(o, R) * 0.01)
        self.s = 16 / R
    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.s

class RMSNorm(nn.Module):
    def __init__(self, c):
        super().__init__(); self.w = nn.Parameter(torch.ones(c), requires_grad=False)
    def forward(self, x):
        return self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

def rope(x, cos, sin):
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat((-x2, x1), -1) * sin

class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = RMSNorm(C), RMSNorm(C)
        self.q, self.k, self.v, self.o = LoraLinear(C, H * D), LoraLinear(C, KV * D), LoraLinear(C, KV * D), LoraLinear(H * D, C)
        self.g, self.u, self.d = LoraLinear(C, I), LoraLinear(C, I), LoraLinear(I, C)
    def forward(self, x, cos, sin):
        h = self.n1(x)
        q = self.q(h).view(B, S, H, D).transpose(1, 2); k = self.k(h).view(B, S, KV, D).transpose(1, 2)
        v = self.v(h).view(B, S, KV, D).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        k = k.repeat_interleave(H // KV, 1); v = v.repeat_interleave(H // KV, 1)
        # torch 1.13 (Debian) has no scaled_dot_product_attention: HF "eager" attention
        sc = (q @ k.transpose(-1, -2)) / math.sqrt(D) + MASK
        a = (torch.softmax(sc, -1) @ v).transpose(1, 2).reshape(B, S, H * D)
        x = x + self.o(a)
        h = self.n2(x)
        return x + self.d(F.silu(self.g(h)) * self.u(h))

emb = nn.Embedding(V, C); emb.weight.requires_grad_(False)
layers = nn.ModuleList([Layer() for _ in range(L)]); norm = RMSNorm(C)
head = nn.Linear(C, V, bias=False); head.weight.requires_grad_(False)
inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)); fr = torch.outer(torch.arange(S).float(), inv)
e = torch.cat((fr, fr), -1); cos, sin = e.cos(), e.sin()
MASK = torch.full((S, S), float('-inf')).triu(1)
ids = torch.randint(0, V, (B, S)); labels = torch.randint(0, V, (B, S))

def step():
    x = emb(ids)
    for l in layers:
        x = checkpoint(l, x, cos, sin, use_reentrant=False)
    logits = head(norm(x))
    loss = F.cross_entropy(logits.view(-1, V), labels.view(-1))
    loss.backward()
    return loss.item()

step()  # warm-up
times = []
for _ in range(3):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
best = min(times)
med = sorted(times)[len(times) // 2]
print(json.dumps({"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(),
                  "step_s": best, "tokens_per_s": B * S / best,
                  "step_s_median": med, "tokens_per_s_median": B * S / med,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": dict(L=L, C=C, H=H, KV=KV, I=I, V=V, B=B, S=S, r=R)}))
