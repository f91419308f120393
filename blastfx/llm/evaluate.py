"""Quality and speed of a causal LM: perplexity on held-out text, a generation sample, tokens/s."""
from __future__ import annotations

import math
import time

import torch


def token_windows(tokenizer, texts, window: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``window``-token windows of the concatenated texts, (N, window)."""
    eos = tokenizer.eos_token or ""
    ids = tokenizer("".join(t + eos for t in texts), return_tensors="pt").input_ids[0]
    n = len(ids) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token loss) over all windows (each scored independently)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = range(0, len(windows), batch_size)
    if progress:
        from tqdm.auto import tqdm
        batches = tqdm(batches, desc="perplexity", unit="batch")
    for start in batches:
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 30) -> str:
    device = next(model.parameters()).device
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


@torch.no_grad()
def tokens_per_second(model, tokenizer, new_tokens: int = 32, prompt: str = "The history of") -> float:
    """Greedy decode speed at batch 1 (wall clock, after one warm-up)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, min_new_tokens=new_tokens,
              max_new_tokens=new_tokens)
    model.generate(ids, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - t0)
