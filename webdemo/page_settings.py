"""The page's sampling settings: their defaults, what is valid, and how a chat keeps them.
No Gradio in it. Each conversation keeps its own settings (library.Chat.settings); a new chat
starts from the defaults, never from the open chat's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model_runtime.protocol import InvalidRequest, ModelInfo

from .conversation import check_settings
from .library import Library


@dataclass(frozen=True)
class SettingsRules:
    """What the sliders may hold for one model. limit: its context length; max_chars: the
    longest system prompt."""

    limit: int
    defaults: dict
    max_chars: int

    @classmethod
    def for_model(cls, info: ModelInfo, max_chars: int) -> "SettingsRules":
        sampling, limit = info.default_sampling, info.max_sequence_length
        defaults = {"max_length": min(sampling.max_length, limit), "top_p": sampling.top_p,
                    "temperature": sampling.temperature, "system": ""}
        return cls(limit, defaults, max_chars)

    def fresh(self) -> dict:
        """A copy of the defaults, for a new chat."""
        return dict(self.defaults)

    def valid(self, settings: dict) -> bool:
        try:
            check_settings(settings["max_length"], settings["top_p"], settings["temperature"], self.limit)
        except (ValueError, InvalidRequest):
            return False
        return isinstance(settings["system"], str) and len(settings["system"]) <= self.max_chars

    def save(self, library: Library, max_length: Any, top_p: Any, temperature: Any, system: Any) -> dict:
        """Keep the page's settings in the open chat unless they are invalid; what it holds now."""
        settings = {"max_length": max_length, "top_p": top_p, "temperature": temperature,
                    "system": system if isinstance(system, str) else ""}
        if self.valid(settings):
            library.current.settings = settings
        return library.current.settings
