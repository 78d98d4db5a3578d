"""Stable Diffusion over HTTP: native /api/images and OpenAI's /v1/images/*."""
