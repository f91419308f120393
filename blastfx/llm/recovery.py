"""Recovery training: distill the dense model's outputs into the compressed one.

A plain PyTorch loop (no Trainer needed): for each batch of ``input_ids`` the teacher's outputs are
computed under ``no_grad`` and the student matches them. A language model (its output has
``logits``) minimizes the KL divergence to the teacher's next-token distribution (temperature
``temperature``), optionally mixed with next-token cross-entropy; an encoder (its output has only
``last_hidden_state``, as a BERT-style sentence encoder's) minimizes the squared error of its token
states relative to the teacher's, over the tokens the attention mask keeps: what a pooled sentence
embedding is made of. Only the compressed layers (and, by default, norm weights) are trained;
everything else is frozen, which keeps optimizer memory small.
Works the same on CPU and GPU (the models' device). ``teacher_generate`` makes training text
from the teacher itself when the user has none.
"""
from __future__ import annotations

import itertools
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import structures
from ..structures.blast.nn import BlastLinear


def trainable_parameters(model: nn.Module, train_norms: bool = True) -> list[nn.Parameter]:
    """BLAST factors (and biases), plus norm weights if asked; freezes the rest. Quantized factors
    are refused: their codes cannot take optimizer steps."""
    quantized = [name for name, m in model.named_modules() if isinstance(m, BlastLinear) and m.quantized]
    if quantized:
        raise ValueError(f"{len(quantized)} BLAST layers (e.g. {quantized[0]!r}) store quantized "
                         f"({model.get_submodule(quantized[0]).factor_dtype}) factors, which cannot be trained: compress "
                         "without factor_dtype, finetune, then quantize "
                         "(blastfx.structures.blast.quant.quantize_model(model, 'int8'))")
    chosen = []
    for module in model.modules():
        take = isinstance(module, structures.module_types()) or (train_norms and "norm" in type(module).__name__.lower())
        for p in module.parameters(recurse=False):
            p.requires_grad_(take)
            if take:
                chosen.append(p)
    if not chosen:
        kinds = " or ".join(t.__name__ for t in structures.module_types())
        raise ValueError(f"the model has no {kinds} layers to train: compress it first")
    return chosen


def no_cache_kwargs(model) -> dict:
    """HF models build a KV cache even in training: wasted memory, and its per-layer state makes a
    compiled block (``blastfx.compiler.compile_blocks``) recompile for every layer."""
    return {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}


@dataclass
class FinetuneState:
    """Where a recovery run stands, so that several time-boxed calls (preemptible or time-capped GPU
    jobs) make one run: one warm-up, one cosine over the whole horizon, AdamW's moments kept and
    batches continued where the last call stopped. Give ``schedule_steps`` and/or
    ``schedule_seconds`` (the cosine follows whichever is further along), pass the same object to
    each :func:`finetune` call (it is updated in place), and ``save``/``load`` it between processes."""
    schedule_steps: int | None = None
    schedule_seconds: float | None = None
    step: int = 0
    seconds: float = 0.0
    batch: int = 0
    optimizer: dict | None = None

    FORMAT = "blastfx-finetune-state/1"

    def __post_init__(self):
        if self.schedule_steps is None and self.schedule_seconds is None:
            raise ValueError("FinetuneState needs schedule_steps or schedule_seconds (the whole run's length)")
        if (self.schedule_steps is not None and self.schedule_steps <= 0) or \
                (self.schedule_seconds is not None and self.schedule_seconds <= 0):
            raise ValueError(f"schedule_steps and schedule_seconds must be positive, got "
                             f"{self.schedule_steps} and {self.schedule_seconds}")

    def progress(self, extra_steps: int = 0, extra_seconds: float = 0.0) -> float:
        """Fraction of the schedule done, in [0, 1]."""
        done = 0.0
        if self.schedule_steps is not None:
            done = (self.step + extra_steps) / self.schedule_steps
        if self.schedule_seconds is not None:
            done = max(done, (self.seconds + extra_seconds) / self.schedule_seconds)
        return min(done, 1.0)

    def save(self, path) -> Path:
        """Write atomically: a crash mid-write leaves the previous file, never half of a new one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            torch.save({"format": self.FORMAT, **asdict(self)}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path) -> "FinetuneState":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"finetune state {path} does not exist")
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:                        # torch raises several types for a bad file
            raise ValueError(f"corrupt finetune state {path}: {err}") from None
        if not isinstance(data, dict) or data.pop("format", None) != cls.FORMAT:
            raise ValueError(f"{path} is not a blastfx finetune state ({cls.FORMAT})")
        try:
            return cls(**data)
        except TypeError as err:
            raise ValueError(f"corrupt finetune state {path}: {err}") from None


def distillation_loss(student_logits, teacher_logits, temperature: float = 1.0):
    t = temperature
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s.flatten(0, -2), p.flatten(0, -2), log_target=True, reduction="batchmean") * t * t


def hidden_state_loss(student_hidden, teacher_hidden, mask=None):
    """Squared error of the student's token states relative to the teacher's: sum over the kept
    tokens of ||s - t||^2 over the sum of ||t||^2 (0 when equal, 1 for a student that outputs zeros,
    whatever the states' scale). ``mask`` (batch, tokens): 1 for tokens that count (padding: 0)."""
    diff = (student_hidden.float() - teacher_hidden.float()).square().sum(-1)
    ref = teacher_hidden.float().square().sum(-1)
    if mask is not None:
        keep = mask.to(diff.dtype)
        diff, ref = diff * keep, ref * keep
    return diff.sum() / ref.sum().clamp_min(torch.finfo(torch.float32).tiny)


OBJECTIVES = ("logits", "hidden")


def _distill_loss(objective: str, s_out, t_out, ids, mask, temperature: float, ce_weight: float):
    """The step's loss; with an attention ``mask`` only real tokens count (for logits: positions
    whose token and next token are both real)."""
    if objective == "hidden":
        return hidden_state_loss(s_out.last_hidden_state, t_out.last_hidden_state, mask)
    s_logits, t_logits, targets = s_out.logits[:, :-1], t_out.logits[:, :-1], ids[:, 1:]
    if mask is not None:
        keep = mask[:, :-1].bool() & mask[:, 1:].bool()
        s_logits, t_logits, targets = s_logits[keep], t_logits[keep], targets[keep]
    loss = distillation_loss(s_logits, t_logits, temperature)
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(s_logits.flatten(0, -2).float(), targets.flatten())
    return loss


def _objective_of(output, objective: str | None) -> str:
    """The objective a model output supports: "logits" where it has them, else "hidden" where it
    has ``last_hidden_state``; a requested one it lacks is an error naming what it has."""
    has = {"logits": getattr(output, "logits", None) is not None,
           "hidden": getattr(output, "last_hidden_state", None) is not None}
    if objective is None:
        objective = "logits" if has["logits"] else "hidden" if has["hidden"] else None
        if objective is None:
            raise ValueError(f"the teacher's output ({type(output).__name__}) has neither logits nor "
                             "last_hidden_state: finetune distills one of them")
    if not has[objective]:
        field = "logits" if objective == "logits" else "last_hidden_state"
        raise ValueError(f"objective={objective!r} distills the output's {field}, which the teacher's output "
                         f"({type(output).__name__}) does not have")
    return objective


def finetune(model: nn.Module, teacher: nn.Module, batches, *, steps: int = 100, lr: float = 1e-4,
             temperature: float = 1.0, ce_weight: float = 0.0, train_norms: bool = True,
             warmup: int = 10, grad_clip: float = 1.0, progress: bool = True, log_every: int = 10,
             max_seconds: float | None = None, amp: bool | None = None, state: FinetuneState | None = None,
             callback=None, objective: str | None = None, dropout: bool = False):
    """Distill ``teacher`` into the compressed ``model`` for ``steps`` optimizer steps over ``batches``
    (cycled), each a tensor of input_ids or a dict with "input_ids" (and, for padded text, an
    "attention_mask", passed to both models). Returns the list of losses.

    ``objective``: "logits" (KL divergence to the teacher's next-token distribution; ``temperature``
    and ``ce_weight`` apply), "hidden" (:func:`hidden_state_loss` on ``last_hidden_state``, for
    encoders; the attention mask, if given, leaves padding out), or None: "logits" if the teacher's
    output has logits, else "hidden".

    ``dropout``: False (default) trains the student in eval mode, as block reconstruction does: the
    targets are the teacher's deterministic outputs, and dropout noise (a BERT's 0.1) only hides
    them (on a small encoder it made the held-out error grow while the loss fell). True trains in
    training mode, which HF models also need for gradient checkpointing.

    ``max_seconds`` turns it into a time budget: training stops when it is spent and the cosine
    learning-rate schedule runs on whichever of steps or time is further along, so a time-boxed run
    still ends at a small learning rate. ``amp`` (default: on for CUDA) runs both models under bf16
    autocast with fp32 master factors.

    ``state`` (a :class:`FinetuneState`) makes this call one part of a longer run: the schedule is the
    state's, ``steps`` and ``max_seconds`` only bound this call, and the state is updated in place.

    ``callback(step, loss, seconds)``, if given, runs after every step (step and seconds counted over
    the whole run, as in the state): for logging, or evaluating a long run as it goes. With
    ``dropout=True`` the model is in training mode when it is called; a callback that evaluates
    must put it back.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or None (chosen from the output), got {objective!r}")
    if objective == "hidden" and ce_weight:
        raise ValueError("ce_weight mixes in next-token cross-entropy, which needs logits: "
                         "use it with objective='logits'")
    if max_seconds is not None and max_seconds <= 0:
        raise ValueError(f"max_seconds must be positive, got {max_seconds}")
    batches = list(batches)
    if not batches:
        raise ValueError("finetune needs at least one batch")
    run = state if state is not None else FinetuneState(schedule_steps=steps, schedule_seconds=max_seconds)
    if run.progress() >= 1.0:
        raise ValueError(f"this run's schedule is already complete ({run.step} steps, {run.seconds:.0f} s)")
    params = trainable_parameters(model, train_norms)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = time.perf_counter()

    def lr_factor(k):                                   # k: this call's step
        warm = min(1.0, (run.step + k + 1) / max(warmup, 1))
        return warm * 0.5 * (1 + math.cos(math.pi * run.progress(k, time.perf_counter() - start)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    if run.optimizer is not None:
        try:
            opt.load_state_dict(run.optimizer)
        except ValueError as err:
            raise ValueError(f"the finetune state's optimizer does not fit this model's trainable "
                             f"parameters (same model, budget and train_norms?): {err}") from None
    device = next(model.parameters()).device
    if amp is None:
        amp = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    teacher.eval()
    model.train(dropout)
    losses = []
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="blastfx: distilling", unit="step")
    first = run.batch % len(batches)
    source = itertools.cycle(batches[first:] + batches[:first])
    t_kwargs, s_kwargs = no_cache_kwargs(teacher), no_cache_kwargs(model)
    try:
        for step in it:
            batch = next(source)
            ids = (batch["input_ids"] if isinstance(batch, dict) else batch).to(device)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            extra = {} if mask is None else {"attention_mask": mask.to(device)}
            with torch.no_grad(), autocast:
                t_out = teacher(input_ids=ids, **extra, **t_kwargs)
            if step == 0:
                objective = _objective_of(t_out, objective)
                if objective == "hidden" and ce_weight:
                    raise ValueError("ce_weight mixes in next-token cross-entropy, which needs logits; the "
                                     f"teacher's output ({type(t_out).__name__}) has none")
            with autocast:
                s_out = model(input_ids=ids, **extra, **s_kwargs)
            loss = _distill_loss(objective, s_out, t_out, ids, extra.get("attention_mask"), temperature, ce_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress and step % log_every == 0:
                it.set_postfix(loss=f"{loss.item():.4f}")
            elapsed = time.perf_counter() - start
            if callback is not None:
                callback(run.step + step + 1, losses[-1], run.seconds + elapsed)
            if (max_seconds is not None and elapsed >= max_seconds) or run.progress(step + 1, elapsed) >= 1.0:
                break
    finally:
        model.eval()                        # also when a batch or a callback raises
    run.step += len(losses)
    run.seconds += time.perf_counter() - start
    run.batch = (first + len(losses)) % len(batches)
    run.optimizer = opt.state_dict()
    return losses


@torch.no_grad()
def teacher_generate(teacher, prompts, seq_len: int = 256, batch_size: int = 64, temperature: float = 1.0,
                     top_p: float = 0.95, seed: int = 0) -> torch.Tensor:
    """Training text sampled from the teacher: ``(len(prompts), seq_len)`` token ids, each row a prompt
    (1-D ids) continued to ``seq_len`` tokens. Small real corpora run out long before a GPU's training
    budget does; KD only needs the teacher's logits, so its own samples are as good a target as any.
    Prompts of equal length share a batch, so no padding (and no attention-mask subtleties) is needed."""
    prompts = [torch.as_tensor(p).flatten() for p in prompts]
    groups: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        if not 0 < len(p) < seq_len:
            raise ValueError(f"prompt {k} has {len(p)} tokens; prompts need 1 to seq_len - 1 = {seq_len - 1}")
        groups.setdefault(len(p), []).append(k)
    device = next(teacher.parameters()).device
    gen_cfg = teacher.generation_config
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else gen_cfg.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    sample = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    out = torch.empty(len(prompts), seq_len, dtype=torch.long)
    for length, rows in groups.items():
        new = seq_len - length
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            ids = torch.stack([prompts[k] for k in chunk]).to(device)
            res = teacher.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                   pad_token_id=pad, **sample)
            out[chunk] = res[:, :seq_len].cpu()
    return out

