"""A class-conditional DiT trained on sklearn's digits, compressed (by default to half its block
parameters) and sampled through diffusers' ``DiTPipeline`` before and after.

    python examples/dit_digits.py                 # the full run (about 10 minutes on one CPU core)
    python examples/dit_digits.py --fast          # a small model, for the test suite

What a reader can trust about the samples is a classifier's verdict: an SVM trained on the real
digits' training split (its accuracy on the real test split is the ceiling) labels every generated
digit, and the table gives, per class, the fraction it calls the class that was asked for, for the
dense transformer, the compressed one and the compressed one after a short recovery training (the
denoising loss itself: ``blastfx.finetune`` distills language-model logits, which a DiT has not).
The compressed pipeline is then saved with ``save_pretrained`` and read back with
``DiTPipeline.from_pretrained`` (blastfx imported), and must draw the same images for the same seed.
The sample grids (rows = classes) are written as PNGs.

The digits are 8x8, small enough to diffuse in pixel space. ``DiTPipeline`` always decodes its
latents with a VAE, so the pipeline gets an ``AutoencoderKL`` set by hand to pass pixels through
(:func:`pass_through_vae`); the images are what the transformer made.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import blastfx

CLASSES = 10
IMAGE = 8                                     # the digits are 8 x 8, 17 grey levels
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class Size:
    """Model and run size: the full run, or the fast one the test suite runs."""
    heads: int                                # of 32 channels each
    layers: int
    train_steps: int
    recovery_steps: int
    samples_per_class: int
    inference_steps: int
    batch: int = 128


FULL = Size(heads=4, layers=4, train_steps=1500, recovery_steps=300, samples_per_class=50, inference_steps=50)
FAST = Size(heads=2, layers=2, train_steps=60, recovery_steps=10, samples_per_class=4, inference_steps=8,
            batch=64)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be positive, got {value}")
        return value
    return parse


def _non_negative_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be 0 or more, got {value}")
        return value
    return parse


def _budget(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budget must be a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--budget must be in (0, 1), got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="a small model and few steps (the test suite's run)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images",
                   help="folder for dit_digits_dense.png and dit_digits_blast.png (default: docs/images)")
    p.add_argument("--save-dir", type=Path, default=None,
                   help="empty or new folder to save the compressed pipeline in (default: a temporary one)")
    p.add_argument("--seed", type=_non_negative_int("--seed"), default=0, help="training and sampling seed")
    p.add_argument("--budget", type=_budget, default=0.5, help="fraction of the block parameters kept (default 0.5)")
    p.add_argument("--train-steps", type=_positive_int("--train-steps"), default=None,
                   help=f"training steps of the dense DiT (default {FULL.train_steps}; --fast: {FAST.train_steps})")
    p.add_argument("--recovery-steps", type=_non_negative_int("--recovery-steps"), default=None,
                   help=f"denoising-loss steps on the compressed transformer, 0 for none (default "
                        f"{FULL.recovery_steps}; --fast: {FAST.recovery_steps})")
    p.add_argument("--samples-per-class", type=_positive_int("--samples-per-class"), default=None,
                   help=f"digits drawn per class and model (default {FULL.samples_per_class}; --fast: "
                        f"{FAST.samples_per_class})")
    p.add_argument("--inference-steps", type=_positive_int("--inference-steps"), default=None,
                   help=f"DDIM steps per sample (default {FULL.inference_steps}; --fast: {FAST.inference_steps})")
    p.add_argument("--threads", type=_positive_int("--threads"), default=1,
                   help="CPU threads for torch while the example runs (default 1: a small model on a shared "
                        "machine runs fastest on one)")
    args = p.parse_args(argv)
    size = FAST if args.fast else FULL
    for name in ("train_steps", "recovery_steps", "samples_per_class", "inference_steps"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))
    args.size = size
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out must be a folder, got the file {args.out}")
    if args.save_dir is not None and args.save_dir.exists() and (not args.save_dir.is_dir()
                                                                 or any(args.save_dir.iterdir())):
        p.error(f"--save-dir must be an empty or new folder, got {args.save_dir}")
    return args


# -------------------------------------------------------------------------------------------- data

def digits(seed=0):
    """sklearn's digits in [0, 1] as (N, 8, 8), shuffled with ``seed``: 1400 to train on, 397 held out."""
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    return (X[:1400], y[:1400]), (X[1400:], y[1400:])


def to_pixels(images01: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (N, 8, 8) as the transformer's (N, 1, 8, 8) in [-1, 1]: ``DiTPipeline`` maps
    its decoded samples back with x / 2 + 0.5."""
    return images01[:, None] * 2 - 1


# ----------------------------------------------------------------------------------------- models

def build_transformer(size: Size, seed: int):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    # num_embeds_ada_norm=CLASSES: a label table of 10 classes (+1 for the label dropout diffusers
    # applies in training). The pipeline is called with guidance_scale=1 (plain conditional
    # sampling): its classifier-free guidance asks for ImageNet's null label 1000.
    return DiTTransformer2DModel(num_attention_heads=size.heads, attention_head_dim=32, in_channels=1, out_channels=1,
                                 num_layers=size.layers, sample_size=IMAGE, patch_size=2,
                                 num_embeds_ada_norm=CLASSES, norm_num_groups=1)


def pass_through_vae():
    """An ``AutoencoderKL`` whose decoder returns its input (and whose encoder's mean is its input).

    Every resnet's last convolution is zero, so each resnet is the identity. What is left is
    conv_in -> GroupNorm -> SiLU -> conv_out. conv_in writes (x, -x, C, -C): the group's mean is 0 and
    its variance (mean(x^2) + C^2) / 2, nearly constant for C >> |x|, so the norm is a scaling by
    sqrt(2) / C up to a relative error below mean(x^2) / (2 C^2) (1e-6 for |x| <= 1.4); SiLU(a) -
    SiLU(-a) = a exactly, so conv_out (C / sqrt(2), -C / sqrt(2)) on the two signed channels gives x
    back. :func:`check_pass_through` measures it.
    """
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, sample_size=IMAGE, scaling_factor=1.0,
                        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)
    C = 1000.0
    with torch.no_grad():
        for coder, outputs in ((vae.encoder, 2), (vae.decoder, 1)):
            for resnet in (m for m in coder.modules() if type(m).__name__ == "ResnetBlock2D"):
                resnet.conv2.weight.zero_()
                resnet.conv2.bias.zero_()
            coder.conv_in.weight.zero_()
            coder.conv_in.weight[:2, 0, 1, 1] = torch.tensor([1.0, -1.0])
            coder.conv_in.bias.copy_(torch.tensor([0.0, 0.0, C, -C]))
            coder.conv_norm_out.weight.fill_(1.0)
            coder.conv_norm_out.bias.zero_()
            coder.conv_out.weight.zero_()
            coder.conv_out.weight[0, :2, 1, 1] = torch.tensor([C, -C]) / 2 ** 0.5
            coder.conv_out.bias.zero_()
            if outputs == 2:                          # the encoder's log-variance: as small as it is clamped to
                coder.conv_out.bias[1] = -30.0
    return vae.eval()


def check_pass_through(vae, images: torch.Tensor, atol=1e-4) -> float:
    """The largest |decode(x) - x| over ``images`` (N, 1, 8, 8); an error if above ``atol``."""
    with torch.no_grad():
        err = (vae.decode(images).sample - images).abs().max().item()
    if not err <= atol:
        raise RuntimeError(f"the pass-through VAE changes pixels by up to {err:.2e} (allowed {atol:.0e})")
    return err


def train_scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def make_pipeline(transformer, vae):
    """``DiTPipeline`` with a DDIM sampler on the training noise schedule."""
    from diffusers import DDIMScheduler, DiTPipeline
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=DDIMScheduler.from_config(train_scheduler().config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------- training

def train(transformer, X, y, steps: int, *, batch: int, lr: float, seed: int, log=None) -> list[float]:
    """``steps`` AdamW steps of the DDPM noise-prediction loss on images X (N, 1, 8, 8) with labels y,
    a linear warm-up and cosine decay; returns the losses. Trains every parameter, BLAST factors
    included, so the same loop trains the dense model and recovers the compressed one."""
    sched = train_scheduler()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                        # diffusers' label dropout draws from the global generator
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(k, steps) / steps)))
    losses = []
    transformer.train()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        x0 = X[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        pred = transformer(sched.add_noise(x0, noise, t), timestep=t, class_labels=y[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        lr_at.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1:5d}/{steps}  loss {np.mean(losses[-max(1, steps // 10):]):.4f}")
    transformer.eval()
    return losses


def calibration_batches(X, y, *, timesteps=8, batch=128, seed=0) -> list[dict]:
    """The transformer's inputs at ``timesteps`` noise levels spread over the schedule, one batch of
    noised training images each: the layers see what they see while sampling."""
    sched = train_scheduler()
    g = torch.Generator().manual_seed(seed)
    T = sched.config.num_train_timesteps
    out = []
    for t in ((torch.arange(timesteps) + 0.5) * T / timesteps).long():
        idx = torch.randperm(len(y), generator=g)[:batch]
        x0 = X[idx]
        noisy = sched.add_noise(x0, torch.randn(x0.shape, generator=g), t.expand(len(idx)))
        out.append({"hidden_states": noisy, "timestep": t.expand(len(idx)).clone(), "class_labels": y[idx]})
    return out


# ---------------------------------------------------------------------------------------- quality

def sample(pipe, per_class: int, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class through ``pipe(...)``: images (N, 8, 8) in [0, 1], labels."""
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    out = pipe(class_labels=labels.tolist(), guidance_scale=1.0, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(seed), output_type="np").images
    return torch.from_numpy(np.ascontiguousarray(out[..., 0])), labels


def fit_classifier(X, y):
    """An RBF SVM on the real training digits (flattened, [0, 1])."""
    from sklearn.svm import SVC
    return SVC(C=10.0, gamma="scale").fit(X.reshape(len(X), -1).numpy(), y.numpy())


def per_class_accuracy(clf, images, labels) -> tuple[np.ndarray, float]:
    """The fraction of each class's images ``clf`` assigns to that class, and over all images."""
    pred = clf.predict(images.reshape(len(images), -1).numpy())
    truth = labels.numpy()
    per = np.array([(pred[truth == c] == c).mean() for c in range(CLASSES)])
    return per, float((pred == truth).mean())


def parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ output

def write_grid(images: torch.Tensor, per_class: int, path: Path, title: str, columns: int = 12) -> None:
    """A grid of samples, one row per class (at most ``columns`` each), written atomically as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(columns, per_class)
    fig, axes = plt.subplots(CLASSES, cols, figsize=(0.6 * cols + 0.4, 0.6 * CLASSES + 0.5), squeeze=False)
    for c in range(CLASSES):
        for j in range(cols):
            ax = axes[c, j]
            ax.imshow(images[c * per_class + j].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(c), rotation=0, labelpad=8, va="center")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")     # created with the umask's permissions
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def save_pipeline(pipe, where: Path) -> None:
    """``pipe.save_pretrained(where)`` into a new folder beside ``where``, renamed to it once complete
    (``where`` must be new or empty): an interrupted save leaves no partial pipeline behind."""
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{where.name}.", dir=where.parent))
    try:
        pipe.save_pretrained(staging)
        os.replace(staging, where)                   # atomic; replaces an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Result:
    ceiling: float                               # the classifier's accuracy on the real test split
    ceiling_per_class: np.ndarray
    acc: dict = field(default_factory=dict)      # model name -> (per-class array, overall)
    params: dict = field(default_factory=dict)   # model name -> transformer parameters
    seconds: dict = field(default_factory=dict)
    reload_identical: bool = False
    plan: object = None
    pngs: list = field(default_factory=list)


def table(result: Result) -> str:
    """The markdown table: per class, the real-test ceiling and each model's accuracy on its samples."""
    names = list(result.acc)
    head = "| class | real test (ceiling) | " + " | ".join(names) + " |"
    rows = [head, "|" + "---|" * (2 + len(names))]
    for c in range(CLASSES):
        rows.append(f"| {c} | {result.ceiling_per_class[c]:.2f} | "
                    + " | ".join(f"{result.acc[n][0][c]:.2f}" for n in names) + " |")
    rows.append(f"| **all** | **{result.ceiling:.3f}** | "
                + " | ".join(f"**{result.acc[n][1]:.3f}**" for n in names) + " |")
    rows.append("| transformer parameters | | " + " | ".join(f"{result.params[n]:,}" for n in names) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- run

def run(args, log=print) -> Result:
    from diffusers import DiTPipeline

    size = args.size
    args.out.mkdir(parents=True, exist_ok=True)          # an unusable folder fails now, not after training
    if args.save_dir is not None:
        args.save_dir.parent.mkdir(parents=True, exist_ok=True)
    (X01, y), (Xt01, yt) = digits(args.seed)
    X, Xt = to_pixels(X01), to_pixels(Xt01)

    clf = fit_classifier(X01, y)
    ceiling_per, ceiling = per_class_accuracy(clf, Xt01, yt)
    log(f"digits classifier (SVM on the real training split): {ceiling:.3f} on the real test split (chance 0.10)")
    result = Result(ceiling=ceiling, ceiling_per_class=ceiling_per)

    vae = pass_through_vae()
    log(f"pass-through VAE: largest pixel change {check_pass_through(vae, torch.cat([X, Xt])):.1e}")

    dense = build_transformer(size, args.seed)
    log(f"training the DiT ({parameters(dense):,} parameters, {args.train_steps} steps of {size.batch})")
    t0 = time.perf_counter()
    train(dense, X, y, args.train_steps, batch=size.batch, lr=1e-3, seed=args.seed, log=log)
    result.seconds["train"] = time.perf_counter() - t0

    def evaluate(name, transformer):
        t0 = time.perf_counter()
        images, labels = sample(make_pipeline(transformer, vae), args.samples_per_class, args.inference_steps,
                                args.seed)
        result.seconds[f"sample {name}"] = time.perf_counter() - t0
        result.acc[name] = per_class_accuracy(clf, images, labels)
        result.params[name] = parameters(transformer)
        log(f"{name}: classifier accuracy on its samples {result.acc[name][1]:.3f}")
        return images

    dense_images = evaluate("dense", dense)

    student = copy.deepcopy(dense)
    t0 = time.perf_counter()
    blastfx.compress(student, args.budget, calibration=calibration_batches(X, y, seed=args.seed),
                     config=blastfx.BlastConfig(progress=False, sequential=False))   # one pass: training recovers
    result.seconds["compress"] = time.perf_counter() - t0
    result.plan = student.blastfx_plan
    log(result.plan.summary())
    name = f"BLAST {args.budget:g}"
    blast_images = evaluate(name, student)

    if args.recovery_steps:
        t0 = time.perf_counter()
        log(f"recovery: {args.recovery_steps} denoising steps on the compressed transformer")
        train(student, X, y, args.recovery_steps, batch=size.batch, lr=3e-4, seed=args.seed + 1, log=log)
        result.seconds["recovery"] = time.perf_counter() - t0
        name = f"BLAST {args.budget:g} + recovery"
        blast_images = evaluate(name, student)

    pipe = make_pipeline(student, vae)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp) / "pipeline" if args.save_dir is None else args.save_dir
        save_pipeline(pipe, where)
        loaded = DiTPipeline.from_pretrained(where)
        loaded.set_progress_bar_config(disable=True)
        if not isinstance(loaded.transformer.transformer_blocks[0].attn1.to_q, blastfx.BlastLinear):
            raise RuntimeError(f"{where}: DiTPipeline.from_pretrained did not build the BLAST layers")
        again, _ = sample(loaded, args.samples_per_class, args.inference_steps, args.seed)
    result.reload_identical = bool(torch.equal(again, blast_images))
    log(f"saved and reloaded through DiTPipeline: {'identical' if result.reload_identical else 'DIFFERENT'} "
        f"images for seed {args.seed}")

    for label, images, file in (("dense", dense_images, "dit_digits_dense.png"),
                                (name, blast_images, "dit_digits_blast.png")):
        path = args.out / file
        acc = result.acc["dense" if label == "dense" else name][1]
        write_grid(images, args.samples_per_class, path,
                   f"DiT on digits, {label} ({result.params[label]:,} params): classifier accuracy {acc:.2f}")
        result.pngs.append(path)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    with torch_threads(args.threads):
        result = run(args)
    print()
    print(table(result))
    print()
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.seconds.items())
          + f", total {time.perf_counter() - start:.0f}")
    print("wrote " + ", ".join(str(p) for p in result.pngs))
    return 0 if result.reload_identical else 1


if __name__ == "__main__":
    sys.exit(main())
