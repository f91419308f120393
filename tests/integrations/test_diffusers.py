"""Compressed diffusers models: pipelines save and load them, layerwise casting casts their factors,
group offloading moves them, QKV fusion says why it cannot fuse them."""
import copy
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


def compress(model, factor_dtype=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blastfx.WeightOnlyWarning)
        config = QUIET if factor_dtype is None else BlastConfig(progress=False, factor_dtype=factor_dtype)
        return blastfx.compress(model, 0.5, config=config)


def sd3_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
                pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([3]))


def run_sd3(model):
    with torch.no_grad():
        return model(**sd3_inputs()).sample


def tiny_vae():
    """A 4-channel latent VAE with one 2x downsampling, small enough to decode 8x8 latents at once."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                         norm_num_groups=4, sample_size=16).eval()


@pytest.mark.parametrize("factor_dtype", [None, "int8", "int4"])
def test_dit_pipeline_saves_and_loads_a_compressed_transformer(tmp_path, factor_dtype):
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline(transformer=compress(models.tiny_dit(), factor_dtype), vae=tiny_vae(),
                       scheduler=DDIMScheduler())

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
    layer = loaded.transformer.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, BlastLinear)
    saved = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert layer.U.dtype == saved.U.dtype and layer.V.dtype == saved.V.dtype    # codes stay codes
    if factor_dtype is not None:
        assert saved.U.dtype in (torch.int8, torch.uint8)
    out = run(loaded)
    assert (out == ref).all()


PROMPT = "a red cat sits on the mat"


def tiny_pixart_pipeline():
    """A PixArt-alpha pipeline of tiny parts built from configs: a T5 tokenizer from an in-memory
    vocabulary (a T5 tokenizer needs no sentencepiece file when given its pieces), a one-layer T5
    encoder whose width is the transformer's ``caption_channels``, :func:`tiny_vae` and
    ``models.tiny_pixart``."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [(f"\u2581{w}", -1.0) for w in sorted(set(PROMPT.split()) | {"dog", "blue"})]
    tokenizer = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0), *pieces],
                            extra_ids=0)
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                           num_heads=2)).eval()
    return PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                               transformer=models.tiny_pixart(), scheduler=DDIMScheduler())


def draw_pixart(pipe):
    """Images for a fixed prompt and seed (classifier-free guidance on, so the transformer sees a batch
    of two). The tiny transformer's sample size has no aspect-ratio bins, and the caption cleaner needs
    packages the pipeline does not: both are off."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                max_sequence_length=8, use_resolution_binning=False, clean_caption=False).images


def test_pixart_pipeline_calibrated_round_trip(tmp_path):
    """The transformer is compressed with what it sees while the pipeline samples (its inputs at every
    step, recorded by a forward pre-hook), then the whole pipeline -- tokenizer, T5, VAE, scheduler and
    the compressed transformer -- goes through ``save_pretrained`` / ``PixArtAlphaPipeline.from_pretrained``
    and draws the same images for the same seed."""
    from diffusers import PixArtAlphaPipeline

    pipe = tiny_pixart_pipeline()
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(PROMPT).input_ids
    batches = []

    def record(module, args, kwargs):
        batches.append({"hidden_states": args[0].clone(), **{k: v for k, v in kwargs.items() if k != "return_dict"}})

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    dense = draw_pixart(pipe)
    handle.remove()
    assert len(batches) == 3 and batches[0]["hidden_states"].shape == (2, 4, 8, 8)

    blastfx.compress(pipe.transformer, 0.5, calibration=batches, config=QUIET)
    plan = pipe.transformer.blastfx_plan
    assert plan.objective not in (None, "weight")          # fitted to the recorded inputs, not the weights alone
    assert len(plan.layers) == 20                          # every linear of the two blocks
    ref = draw_pixart(pipe)
    assert ref.shape == (1, 16, 16, 3) and not (ref == dense).all()

    pipe.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "blastfx"
    assert "quantization_config" not in json.loads((tmp_path / "text_encoder" / "config.json").read_text())
    loaded = PixArtAlphaPipeline.from_pretrained(tmp_path)
    assert {n for n, m in loaded.transformer.named_modules() if isinstance(m, BlastLinear)} == set(plan.layers)
    assert not any(isinstance(m, BlastLinear) for m in loaded.text_encoder.modules())
    assert (draw_pixart(loaded) == ref).all()


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


def pixart_inputs():
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                timestep=torch.tensor([3, 500]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def run_pixart(model):
    with torch.no_grad():
        return model(**pixart_inputs()).sample


def offload_groups(model):
    """Each module with a group offloading hook, by name, with the group that hook moves."""
    found = {}
    for name, module in model.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            found[name] = hook.group
    return found


def group_tensors(group):
    return [*(p for m in group.modules for p in m.parameters()), *group.parameters]


def offload(model, offload_type, **kw):
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                               offload_type=offload_type,
                               num_blocks_per_group=1 if offload_type == "block_level" else None, **kw)


@pytest.fixture(scope="module")
def compressed_pixart():
    """One compressed PixArt transformer for the offloading tests, which each offload a deep copy."""
    return compress(models.tiny_pixart())


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_moves_the_factors_with_their_group(offload_type, compressed_pixart):
    """diffusers groups a compressed transformer as it would the dense one: at leaf level each BLAST
    layer is a leaf group of its own, where an unknown layer type would only be swept into its parent's
    group; at block level its factors travel with its block. CPU to CPU offloading moves nothing, so
    here the outputs only have to stay the same; the disk test below makes the moves observable."""
    model = copy.deepcopy(compressed_pixart)
    ref = run_pixart(model)
    offload(model, offload_type)
    dense = models.tiny_pixart()
    offload(dense, offload_type)
    groups = offload_groups(model)
    assert set(groups) == set(offload_groups(dense))
    blast = {n: m for n, m in model.named_modules() if isinstance(m, BlastLinear)}
    assert len(blast) == 20
    if offload_type == "leaf_level":
        assert all(groups[n].modules == [m] for n, m in blast.items())
    else:
        assert all(n.split(".")[0] == "transformer_blocks" for n in blast)
    held = {id(t) for g in groups.values() for t in group_tensors(g)}
    assert all(id(p) in held for m in blast.values() for p in (m.U, m.S, m.V))
    assert torch.equal(run_pixart(model), ref)
    assert torch.equal(run_pixart(model), ref)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_to_disk_reloads_the_factors_each_forward(offload_type, compressed_pixart, tmp_path):
    """With ``offload_to_disk_path`` an offloaded group's tensors are written to a safetensors file and
    replaced by empty placeholders; a forward loads them back. The placeholders are filled with NaN
    before each forward: equal outputs mean every factor was onloaded from the file, every time."""
    from safetensors.torch import load_file

    model = copy.deepcopy(compressed_pixart)
    ref = run_pixart(model)
    saved = {n: t.clone() for n, t in model.named_parameters()}
    offload(model, offload_type, offload_to_disk_path=str(tmp_path))
    groups = offload_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups.values():                   # the files hold the trained values of their group's tensors
        if group_tensors(group):
            stored = load_file(group.safetensors_file_path)
            for t in group_tensors(group):
                assert torch.equal(stored[group.tensor_to_key[t]], saved[names[id(t)]]), names[id(t)]
    factors = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, BlastLinear) for k in "USV"}
    assert len(factors) == 60 and factors <= {names[id(t)] for g in groups.values() for t in group_tensors(g)}
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        assert torch.equal(run_pixart(model), ref)


@pytest.mark.cuda
@pytest.mark.parametrize("use_stream", [False, True])
def test_group_offloading_onto_the_gpu(use_stream, compressed_pixart):
    """The use group offloading is for: factors kept on the CPU, each BLAST layer brought to the GPU for
    its own forward (with a CUDA stream, prefetched one layer ahead) and sent back after it."""
    model = copy.deepcopy(compressed_pixart)
    ref = run_pixart(model)
    model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                               offload_type="leaf_level", use_stream=use_stream)
    factors = [p for m in model.modules() if isinstance(m, BlastLinear) for p in (m.U, m.S, m.V)]
    assert len(factors) == 60 and all(p.device.type == "cpu" for p in factors)
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pixart_inputs().items()}
    for _ in range(2):                              # the first forward also traces the prefetch order
        with torch.no_grad():
            out = model(**inputs).sample
        torch.cuda.synchronize()
        assert out.device.type == "cuda" and all(p.device.type == "cpu" for p in factors)
        torch.testing.assert_close(out.cpu(), ref, atol=1e-3, rtol=1e-3)


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
