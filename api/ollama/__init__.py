"""The Ollama-compatible API: /api/chat, /api/generate."""
