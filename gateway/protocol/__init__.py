"""OpenAI wire models: request parsing and response building. Imports no torch, no backend."""
from .requests import ChatMessage, ChatRequest, CompletionRequest, parse_chat, parse_completion

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "parse_chat", "parse_completion"]
