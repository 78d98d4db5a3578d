"""Fine-tuning: LoRA adapters of the Stable Diffusion UNet, trained on a tenant's images."""
