"""Tiny random-weight models of the real architectures, for dev mode and tests.

`gpuhost models make-tiny DIR` writes:
- DIR/llava-llama3: LLaVA (CLIP ViT-L/14-336 geometry: 336 px, 14 px patches, 576 image
  tokens) over a Llama decoder with an 8K context, a byte-level BPE tokenizer with Llama 3's
  special tokens, Llama 3's chat template and a LlavaProcessor;
- DIR/stable-diffusion: UNet, VAE (8x downsampling), CLIP text encoder and tokenizer, and a
  scheduler, as a diffusers StableDiffusionPipeline; and an IP-Adapter for style from a
  reference image (its CLIP vision encoder, image projection and cross-attention layers).
Both load through the same `from_pretrained` code as the real weights, offline.
"""

import logging
from pathlib import Path

log = logging.getLogger(__name__)

LLAVA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<image>",
    "<|pad|>",
]

# Llama 3's chat format, with LLaVA's <image> placeholder ahead of a turn's text.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Text the tiny tokenizer learns its merges from (written for this project).
CORPUS = [
    "Describe the image in one sentence.",
    "What is written on the sign in this photo?",
    "The picture shows a red square on a white background.",
    "A screenshot of a terminal window with green text on black.",
    "Read the table and give the total of the second column.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hello! How can I help you today? Here is a short answer.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000, and punctuation: .,;:!?()[]{}'\"-",
]


def _llama3_tokenizer():
    """A byte-level BPE tokenizer with Llama 3's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=LLAVA_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=8192,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer, {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIALS}


def _llama_config(tokenizer, ids: dict[str, int], hidden_size: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=ids["<|begin_of_text|>"],
        eos_token_id=[ids["<|eot_id|>"], ids["<|end_of_text|>"]],
        pad_token_id=ids["<|pad|>"],
    )


def _never_ends(generation_config, text) -> None:
    generation_config.eos_token_id = text.eos_token_id
    generation_config.pad_token_id = text.pad_token_id
    generation_config.bos_token_id = text.bos_token_id
    # Random weights would end an answer at a random token; the tiny models never end their
    # turn by themselves, so that tests set answer lengths with num_predict (and stop strings).
    generation_config.suppress_tokens = text.eos_token_id


def make_text_llama(out: Path, seed: int = 0) -> Path:
    """A tiny text-only Llama 3 (for engines that cannot run LLaVA here, e.g. vLLM on CPU)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer, ids = _llama3_tokenizer()
    text = _llama_config(tokenizer, ids, hidden_size=128)  # head_dim 32: vLLM's CPU kernels
    model = LlamaForCausalLM(text).eval()
    _never_ends(model.generation_config, text)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_llava(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tokenizer, ids = _llama3_tokenizer()

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
        projection_dim=32,
    )
    text = _llama_config(tokenizer, ids)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    model = LlavaForConditionalGeneration(config).eval()
    _never_ends(model.generation_config, text)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("wrote tiny LLaVA to %s", out)
    return out


def _clip_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary: every byte symbol, alone and word-final."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    return {token: i for i, token in enumerate(vocab)}


def make_stable_diffusion(out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer(vocab=_clip_vocab(), merges=[], model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    make_ip_adapter(out, unet, seed)
    log.info("wrote tiny Stable Diffusion to %s", out)
    return out


def make_ip_adapter(out: Path, unet, seed: int = 0) -> None:
    """An IP-Adapter for `unet`, in the layout `workers.engines.sd_style` reads: a tiny CLIP
    vision encoder with projection, the image projection (to 4 tokens of the UNet's
    cross-attention width), and a key and value projection for each cross-attention layer,
    numbered as IP-Adapter's files number them (1, 3, 5... in the UNet's processor order)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from workers.engines.sd_style import ENCODER, FOLDER, WEIGHTS

    torch.manual_seed(seed + 1)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            projection_dim=32,
        )
    )
    width = unet.config.cross_attention_dim
    tokens = 4
    tensors = {
        "image_proj.proj.weight": torch.randn(tokens * width, 32) * 0.2,
        "image_proj.proj.bias": torch.zeros(tokens * width),
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    cross = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
    for number, name in zip(range(1, 2 * len(cross), 2), cross, strict=True):
        attention = unet.get_submodule(name.removesuffix(".processor"))
        inner = attention.to_k.out_features
        for part in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{number}.{part}.weight"] = torch.randn(inner, width) * 0.5
    folder = out / FOLDER
    encoder.save_pretrained(folder / ENCODER)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS)


def make_lora_adapter(model: Path, seed: int = 7, scale: float = 0.1) -> bytes:
    """A LoRA adapter file (diffusers' safetensors format, what fine-tuning writes) for the
    layers of the Stable Diffusion model's UNet that fine-tuning adapts, its weights random: an
    untrained adapter's second matrices are zero and would change nothing."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from workers.training.trainer import TARGETS, adapter_file

    unet = StableDiffusionPipeline.from_pretrained(model).unet
    config = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS)
    unet.add_adapter(config, adapter_name="random")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in unet.named_parameters():
            if "lora_" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    return adapter_file(unet, config, "random")


def make_all(directory: Path, llava_name: str, sd_name: str) -> dict[str, Path]:
    return {
        llava_name: make_llava(directory / llava_name),
        sd_name: make_stable_diffusion(directory / sd_name),
    }
