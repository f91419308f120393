"""Compressed diffusers models: pipelines save and load them, layerwise casting casts their factors,
QKV fusion says why it cannot fuse them."""
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import blastfx
import models
from blastfx import BlastConfig, BlastLinear

pytestmark = pytest.mark.requires("diffusers")
QUIET = BlastConfig(progress=False)


def compress(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        return blastfx.compress(model, 0.5, config=QUIET)


def sd3_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([3]))


def run_sd3(model):
    with torch.no_grad():
        return model(**sd3_inputs()).sample


def test_dit_pipeline_saves_and_loads_a_compressed_transformer(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    pipe = DiTPipeline(transformer=compress(models.tiny_dit()), vae=vae, scheduler=DDIMScheduler())

    def run(p):
        p.set_progress_bar_config(disable=True)
        return p(class_labels=[1], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").images

    ref = run(pipe)
    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "blastfx"
    assert set(config["quantization_config"]["plan"]["layers"]) == set(pipe.transformer.blastfx_plan.layers)
    assert (tmp_path / "transformer" / "README.md").is_file()
    loaded = DiTPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.transformer.transformer_blocks[0].attn1.to_q, BlastLinear)
    out = run(loaded)
    assert (out == ref).all()


def test_sd3_transformer_round_trip_and_dequantize(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = compress(models.tiny_sd3())
    ref = run_sd3(model)
    model.save_pretrained(tmp_path)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path)
    assert {n for n, m in loaded.named_modules() if isinstance(m, BlastLinear)} == set(model.blastfx_plan.layers)
    assert torch.equal(run_sd3(loaded), ref)
    loaded.to(torch.float64)                        # casting stays allowed: the factors are plain floats
    assert loaded.transformer_blocks[0].attn.to_q.U.dtype == torch.float64
    loaded.to(torch.float32)
    dense = loaded.dequantize()
    assert not any(isinstance(m, BlastLinear) for m in dense.modules())
    assert "quantization_config" not in dense.config and getattr(dense, "hf_quantizer", None) is None
    torch.testing.assert_close(run_sd3(dense), ref, atol=1e-5, rtol=1e-5)


def test_a_missing_blast_tensor_fails_loudly(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = compress(models.tiny_sd3())
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["transformer_blocks.0.attn.to_q.V"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"transformer_blocks\.0\.attn\.to_q\.V"):
        SD3Transformer2DModel.from_pretrained(tmp_path)


def test_layerwise_casting_stores_the_factors_in_the_storage_dtype():
    model = compress(models.tiny_sd3())
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    dense = models.tiny_sd3()
    dense.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast_dense = {n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear)
                  and m.weight.dtype == torch.float8_e4m3fn}
    blast = {n: m for n, m in model.named_modules() if isinstance(m, BlastLinear)}
    cast_blast = {n for n, m in blast.items() if m.U.dtype == m.S.dtype == m.V.dtype == torch.float8_e4m3fn}
    assert cast_blast == cast_dense & set(blast) and len(cast_blast) >= 10    # as their dense layers would be
    out = run_sd3(model)
    assert all(blast[n].U.dtype == torch.float8_e4m3fn for n in cast_blast)      # back to storage after the forward
    reference = compress(models.tiny_sd3())       # the same model, every parameter rounded through fp8 storage
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert torch.equal(run_sd3(reference), out)


def test_fusing_qkv_after_compress_names_blast_and_the_way_out():
    model = compress(models.tiny_sd3())
    with pytest.raises(AttributeError, match=r"no dense \.weight.*before blastfx\.compress"):
        model.fuse_qkv_projections()
    fused = models.tiny_sd3()                           # the way out: fuse first, then compress
    ref = run_sd3(fused)
    fused.fuse_qkv_projections()
    compress(fused)
    assert isinstance(fused.transformer_blocks[0].attn.to_qkv, BlastLinear)
    assert run_sd3(fused).shape == ref.shape
