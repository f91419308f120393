"""Tiny random-init models of every family blastfx supports (no hub, no downloads). A builder whose
library (transformers, diffusers: optional extras) is not installed skips the test that calls it."""
import torch
from torch import nn

from conftest import skip_unless_installed


def tiny_llama():
    skip_unless_installed("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1,
                                        eos_token_id=2, pad_token_id=0)).eval()


def compressed_tiny_llama(factor_dtype=None, budget=0.5):
    """``tiny_llama`` compressed with random BLAST factors (no calibration), their U and V rounded to
    ``factor_dtype`` codes if given."""
    import blastfx
    from blastfx.structures.blast.quant import quantize_model

    torch.manual_seed(0)
    model = tiny_llama()
    blastfx.compress(model, budget, config=blastfx.BlastConfig(init="random", progress=False))
    return quantize_model(model, factor_dtype) if factor_dtype else model


def tiny_gpt2():
    skip_unless_installed("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=1, eos_token_id=2)).eval()


def tiny_bert():
    skip_unless_installed("transformers")
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()


def tiny_vit():
    skip_unless_installed("transformers")
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                               num_labels=10)).eval()


def tiny_dit():
    skip_unless_installed("diffusers")
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_num_groups=1).eval()


def tiny_pixart():
    skip_unless_installed("diffusers")
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                    num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=64,
                                    caption_channels=32, norm_num_groups=1).eval()


def tiny_sd3():
    skip_unless_installed("diffusers")
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()


def tiny_mlp():
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 96), nn.GELU(), nn.Linear(96, 48)).eval()


class ResidualBlock(nn.Module):
    """x + down(gelu(up(x))): the smallest block a sequential (block-by-block) compress walks."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 48), nn.Linear(48, 32)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def layer_inputs(model, names, batches):
    """Each named layer's inputs over the batches (tensors or keyword dicts), (tokens, in) in float64."""
    seen = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b) if torch.is_tensor(b) else model(**b)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}
