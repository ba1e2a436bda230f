"""One MLA layer's decode attention, the context expanded to heads (what prefill does, as
transformers does) vs the absorbed latent form Tarragon decodes with: DeepSeek-V3 head dims
(kv_lora_rank 512, nope 128, rope 64, v 128), 16 heads, batch 8, context 1024, fp32, 1 thread.

Run: .venv/bin/python bench/mla_decode.py
"""

import time
from types import SimpleNamespace

import torch

from tarragon.model import AttentionModel, MLAWeights
torch.set_num_threads(1)
nh, r, nope, rope, v, B, C = 16, 512, 128, 64, 128, 8, 1024
cfg = SimpleNamespace(num_heads=nh, kv_lora_rank=r, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v)
m = AttentionModel.__new__(AttentionModel); m.cfg = cfg; m.scale = (nope + rope) ** -0.5
M = MLAWeights(None, None, None, None, None, None, None, None, torch.randn(nh * (nope + v), r) * 0.05)
q, lat, kr = torch.randn(B, nh, nope + rope), torch.randn(B, C, 1, r), torch.randn(B, C, 1, rope)
mask = torch.zeros(B, 1, 1, C)
def expanded():
    k, vv = m.expand_mla(M, lat, kr)  # [B, C, nh, d]
    s = torch.matmul(q.unsqueeze(2), k.permute(0, 2, 3, 1)).squeeze(2) * m.scale + mask.view(B, 1, C)
    return torch.einsum("bhc,bchv->bhv", torch.softmax(s, -1), vv)
absorbed = lambda: m.latent_decode_attention(M, q, lat, kr, mask)
torch.testing.assert_close(expanded(), absorbed(), atol=1e-4, rtol=1e-4)
for name, f in (("expanded", expanded), ("absorbed", absorbed)):
    f(); t = time.perf_counter(); [f() for _ in range(5)]; print(f"{name}: {(time.perf_counter() - t) / 5 * 1000:.1f} ms")
