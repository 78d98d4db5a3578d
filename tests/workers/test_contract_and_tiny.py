"""The gateway-facing contract stays free of model code; the tiny models load like real ones."""

import subprocess
import sys

import torch


def test_contract_and_gateway_import_without_torch():
    probe = (
        "import sys, workers.contract, api.app; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_make_tiny_writes_models_the_real_loaders_accept(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    done = subprocess.run(
        [sys.executable, "-m", "cli", "models", "make-tiny", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-llama3")
    assert llava.config.vision_config.image_size == 336
    assert llava.config.vision_config.patch_size == 14
    assert llava.config.text_config.max_position_embeddings == 8192
    processor = AutoProcessor.from_pretrained(tmp_path / "llava-llama3")
    assert (
        processor.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        in llava.config.text_config.eos_token_id
    )

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "stable-diffusion")
    assert pipe.vae_scale_factor == 8
    image = pipe(
        "a red square",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
