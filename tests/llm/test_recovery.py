import copy
import math
import time

import pytest
import torch

import blastfx
from blastfx import BlastConfig
from blastfx.compiler import compile_blocks
from blastfx.llm.recovery import FinetuneState, distillation_loss, finetune, trainable_parameters
import models


def test_distillation_loss_known_values():
    logits = torch.randn(2, 5, 11)
    assert distillation_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    p = torch.softmax(other, -1)
    expected = (p * (torch.log_softmax(other, -1) - torch.log_softmax(logits, -1))).sum(-1).mean()
    assert distillation_loss(logits, other).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_recovers_teacher_outputs():
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    train = [torch.randint(3, 128, (8, 24)) for _ in range(4)]
    held = torch.randint(3, 128, (8, 24))

    def kl():
        with torch.no_grad():
            return distillation_loss(student(input_ids=held).logits, teacher(input_ids=held).logits).item()

    before = kl()
    frozen = student.model.embed_tokens.weight.clone()
    losses = finetune(student, teacher, train, steps=30, lr=3e-3, progress=False)
    assert kl() < 0.7 * before and losses[-1] < losses[0]
    assert torch.equal(student.model.embed_tokens.weight, frozen)          # only BLAST factors + norms train


def test_finetune_needs_blast_layers():
    with pytest.raises(ValueError, match="no BlastLinear"):
        trainable_parameters(models.tiny_mlp())


def test_time_budget_stops_and_anneals_lr():
    """max_seconds ends the run, and the cosine follows time when time is further along than steps: a
    run stopped by its budget long before its step count ends at a learning rate near zero. The lr
    is read from the state the run leaves (the schedule finetune builds for steps and max_seconds);
    each step's lr is at most the cosine at the time of the previous step's callback."""
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    train = [torch.randint(3, 128, (2, 16))]
    with pytest.raises(ValueError, match="max_seconds"):
        finetune(student, teacher, train, max_seconds=0)
    t0 = time.perf_counter()
    losses = finetune(student, teacher, train, steps=10**6, max_seconds=1.5, progress=False, amp=True)
    assert 1 <= len(losses) < 10**6 and time.perf_counter() - t0 < 15
    assert all(torch.isfinite(torch.tensor(losses)))

    lr, budget = 1e-3, 4.0
    state = FinetuneState(schedule_steps=10**6, schedule_seconds=budget)
    seconds = []
    losses = finetune(student, teacher, train, steps=10**6, max_seconds=budget, lr=lr, warmup=1, state=state,
                      progress=False, callback=lambda step, loss, t: seconds.append(t))
    assert 2 <= len(losses) == state.step < 10**6 and state.seconds >= budget and state.progress() == 1.0
    group = state.optimizer["param_groups"][0]
    assert group["initial_lr"] == lr
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, seconds[-2] / budget)))
    assert group["lr"] <= lr * cosine + 1e-12
    assert group["lr"] < 0.5 * lr                   # past the cosine's midpoint: steps alone would give ~lr


def test_teacher_generate_keeps_prompts_and_matches_greedy_decoding():
    from blastfx.llm.recovery import teacher_generate
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    prompts = [torch.randint(3, 128, (n,)) for n in (4, 6, 4, 4)]          # two lengths -> two groups
    out = teacher_generate(teacher, prompts, seq_len=12, batch_size=2, temperature=0)
    assert out.shape == (4, 12)
    for p, row in zip(prompts, out):
        assert torch.equal(row[:len(p)], p)
        ref = p[None]                       # greedy continuation, one token at a time without a cache
        while ref.shape[1] < 12:
            nxt = teacher(input_ids=ref).logits[:, -1].argmax(-1, keepdim=True)
            ref = torch.cat([ref, nxt], 1)
        assert torch.equal(row, ref[0])
    sampled = teacher_generate(teacher, prompts, seq_len=12, batch_size=4, seed=1)
    assert torch.equal(sampled, teacher_generate(teacher, prompts, seq_len=12, batch_size=4, seed=1))
    assert not torch.equal(sampled, out)
    with pytest.raises(ValueError, match="prompt 0 has 12 tokens"):
        teacher_generate(teacher, [torch.arange(12)], seq_len=12)


def test_finetune_through_the_compiled_inlined_student_matches_eager():
    """The GPU recovery recipe compiles each decoder block (compile_blocks, backend "blast",
    prefill-sized calls inlined): the same steps must give the same losses and factors as eager."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    teacher = models.tiny_llama()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    twin = copy.deepcopy(student)
    blocks = compile_blocks(twin, options={"lowering": "inline"})
    train = [torch.randint(3, 128, (4, 24)) for _ in range(2)]
    eager_losses = finetune(student, teacher, train, steps=3, lr=3e-3, progress=False, warmup=1)
    compiled_losses = finetune(twin, teacher, train, steps=3, lr=3e-3, progress=False, warmup=1)
    blocks.undo()
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    for a, b in zip(student.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _student_and_batches():
    torch.manual_seed(0)
    teacher = models.tiny_llama()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    train = [torch.randint(3, 128, (2, 16)) for _ in range(3)]
    return teacher, student, train


def test_split_run_with_saved_state_equals_one_run(tmp_path):
    """Two calls, the second in a "fresh process" (model and state reloaded from disk), give exactly
    the one-call run: same schedule, same AdamW moments, same batches. A restart without the state
    does not, so the state is what makes them equal."""
    teacher, student, train = _student_and_batches()
    start = copy.deepcopy(student)
    kw = dict(lr=3e-3, warmup=2, progress=False)
    one_run = finetune(student, teacher, train, steps=7, **kw)

    first = copy.deepcopy(start)
    state = FinetuneState(schedule_steps=7)
    seen = []                                       # the callback counts steps over the whole run

    def callback(step, loss, seconds):
        seen.append((step, loss, seconds))
    part1 = finetune(first, teacher, train, steps=4, state=state, callback=callback, **kw)
    assert (state.step, state.batch) == (4, 1)
    blastfx.save(first, tmp_path / "model")
    state.save(tmp_path / "state.pt")
    second = blastfx.load(tmp_path / "model", copy.deepcopy(teacher))
    part2 = finetune(second, teacher, train, steps=10**6, state=FinetuneState.load(tmp_path / "state.pt"),
                     callback=callback, **kw)
    assert len(part2) == 3
    assert [k for k, _, _ in seen] == list(range(1, 8)) and [v for _, v, _ in seen] == part1 + part2
    assert all(b[2] > a[2] for a, b in zip(seen, seen[1:]))
    assert part1 + part2 == pytest.approx(one_run, rel=1e-6)
    for a, b in zip(student.parameters(), second.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    restarted = copy.deepcopy(first)
    finetune(restarted, teacher, train, steps=3, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(student.parameters(), restarted.parameters())) > 1e-4


def test_finetune_state_rejects_bad_input(tmp_path):
    teacher, student, train = _student_and_batches()
    with pytest.raises(ValueError, match="schedule_steps or schedule_seconds"):
        FinetuneState()
    with pytest.raises(ValueError, match="must be positive"):
        FinetuneState(schedule_seconds=0)
    with pytest.raises(ValueError, match="does not exist"):
        FinetuneState.load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt finetune state"):
        FinetuneState.load(tmp_path / "junk.pt")
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a blastfx finetune state"):
        FinetuneState.load(tmp_path / "other.pt")

    state = FinetuneState(schedule_steps=2)
    finetune(student, teacher, train, steps=5, state=state, progress=False)
    assert state.step == 2                                  # the schedule, not `steps`, ended the run
    with pytest.raises(ValueError, match="already complete"):
        finetune(student, teacher, train, state=state, progress=False)
    other = FinetuneState(schedule_steps=10, optimizer=state.optimizer)
    with pytest.raises(ValueError, match="does not fit this model's trainable parameters"):
        finetune(student, teacher, train, steps=1, state=other, train_norms=False, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "other.pt"]   # nothing half-written


# ---------------------------------------------------------------------------------------------
# encoders: distilling hidden states


def test_hidden_state_loss_known_values_and_mask():
    from blastfx.llm.recovery import hidden_state_loss
    t = torch.randn(2, 5, 8)
    assert hidden_state_loss(t, t).item() == 0.0
    assert hidden_state_loss(torch.zeros_like(t), t).item() == pytest.approx(1.0)
    s = t + 0.1 * torch.randn_like(t)
    want = ((s - t).double().square().sum() / t.double().square().sum()).item()
    assert hidden_state_loss(s, t).item() == pytest.approx(want, rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    poisoned_s, poisoned_t = s.clone(), t.clone()
    poisoned_s[0, 3:], poisoned_t[0, 3:] = 1e6, -1e6                 # padding: must not count
    keep = mask.bool()
    want = ((s - t)[keep].double().square().sum() / t[keep].double().square().sum()).item()
    assert hidden_state_loss(poisoned_s, poisoned_t, mask).item() == pytest.approx(want, rel=1e-5)


def test_logit_distillation_leaves_padding_out():
    """With an attention mask, positions whose token or next token is padding do not count: garbage
    teacher logits there leave the loss unchanged, at a real position they change it."""
    from types import SimpleNamespace

    from blastfx.llm.recovery import _distill_loss
    s, t = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    base = _distill_loss("logits", SimpleNamespace(logits=s), SimpleNamespace(logits=t), ids, mask, 1.0, 0.5)
    padded = t.clone()
    padded[0, 3:] = 50 * torch.randn(3, 11)                          # position 3 predicts a padding token
    same = _distill_loss("logits", SimpleNamespace(logits=s), SimpleNamespace(logits=padded), ids, mask, 1.0, 0.5)
    assert same.item() == pytest.approx(base.item(), rel=1e-6)
    real = t.clone()
    real[0, 2] = 50 * torch.randn(11)
    assert _distill_loss("logits", SimpleNamespace(logits=s), SimpleNamespace(logits=real), ids, mask, 1.0,
                         0.5).item() != pytest.approx(base.item(), rel=1e-3)


def _padded_batches(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (4, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 12:] = mask[3, 7:] = 0
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def test_encoder_distillation_recovers_teacher_hidden_states():
    """A BERT encoder has no logits: finetune distills its token states (objective chosen from the
    output), with the batches' attention masks, and the held-out error drops; embeddings stay frozen."""
    from blastfx.llm.recovery import hidden_state_loss
    torch.manual_seed(0)
    teacher = models.tiny_bert().eval()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    (held,) = _padded_batches(1, seed=99)

    def error():
        with torch.no_grad():
            return hidden_state_loss(student(**held).last_hidden_state, teacher(**held).last_hidden_state,
                                     held["attention_mask"]).item()

    before = error()
    frozen = student.embeddings.word_embeddings.weight.clone()
    losses = finetune(student, teacher, _padded_batches(4, seed=1), steps=40, lr=1e-3, progress=False)
    assert error() < 0.7 * before and losses[-1] < losses[0]
    assert torch.equal(student.embeddings.word_embeddings.weight, frozen)
    assert not student.training


def test_finetune_objective_errors_name_the_problem_and_leave_the_model_unchanged():
    torch.manual_seed(0)
    teacher = models.tiny_bert().eval()
    student = blastfx.compress(copy.deepcopy(teacher), 0.4, config=BlastConfig(progress=False))
    before = copy.deepcopy(student.state_dict())
    batches = _padded_batches(1, seed=3)
    with pytest.raises(ValueError, match="objective must be one of .* got 'kl'"):
        finetune(student, teacher, batches, steps=2, progress=False, objective="kl")
    with pytest.raises(ValueError, match="objective='logits' distills the output's logits, which the teacher's "
                                         "output .* does not have"):
        finetune(student, teacher, batches, steps=2, progress=False, objective="logits")
    with pytest.raises(ValueError, match="ce_weight .* needs logits"):
        finetune(student, teacher, batches, steps=2, progress=False, ce_weight=0.5)
    with pytest.raises(ValueError, match="ce_weight .* needs logits"):
        finetune(student, teacher, batches, steps=2, progress=False, ce_weight=0.5, objective="hidden")
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not student.training
    llama = models.tiny_llama()
    small = blastfx.compress(copy.deepcopy(llama), 0.4, config=BlastConfig(progress=False))
    with pytest.raises(ValueError, match="objective='hidden' distills the output's last_hidden_state, which the "
                                         "teacher's output \\(CausalLMOutputWithPast\\) does not have"):
        finetune(small, llama, [torch.randint(3, 128, (2, 12))], steps=2, progress=False, objective="hidden")


def test_dropout_is_off_unless_asked():
    """By default the student trains in eval mode (no dropout noise against a deterministic teacher);
    dropout=True trains in training mode. Seen from a callback, and the model ends in eval mode."""
    teacher = models.tiny_bert().eval()
    student = blastfx.compress(copy.deepcopy(teacher), 0.5, config=BlastConfig(progress=False))
    for dropout in (False, True):
        seen = []
        finetune(student, teacher, _padded_batches(1, seed=5), steps=2, progress=False, dropout=dropout,
                 callback=lambda *_: seen.append(student.training))
        assert seen == [dropout, dropout] and not student.training
