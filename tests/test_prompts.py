"""Prompt rendering: pyttsx3 first, espeak-ng itself when pyttsx3's driver writes no audio."""

from __future__ import annotations

import wave
from pathlib import Path

import pytest

from bridge.config import AsteriskConfig, TtsConfig
from ivr.prompts import PromptLibrary

pytestmark = pytest.mark.unit


def test_a_prompt_pyttsx3_fails_to_write_is_rendered_by_espeak_ng(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    library = PromptLibrary(TtsConfig(), AsteriskConfig(root=tmp_path, instance="unit"))
    tries: list[bool] = []

    def no_audio(text: str, language: str, out: Path, fresh: bool) -> bool:
        tries.append(fresh)
        return False

    monkeypatch.setattr(library, "_speak_pyttsx3", no_audio)
    try:
        path = library.render("谢谢。", "zh-CN")
    finally:
        library.close()
    assert tries == [False, True]  # once with the thread's engine, once with a fresh one
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
        assert wav.getnframes() > 8000 * 0.3
