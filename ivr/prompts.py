"""Prompts: text rendered by pyttsx3 (espeak-ng) to 8 kHz mono wav, cached by a hash of text, voice and language.

Files go straight into the Asterisk instance's prompt folder; ``<key>.txt`` beside each wav keeps its text so an
operator can tell what each file says. Rendering is blocking work (pyttsx3, sox) and runs in one worker
thread, never on the event loop; pyttsx3's engine is not thread-safe, hence a single thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import wave
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bridge.config import AsteriskConfig, TtsConfig
from ivr.flow import Flow

log = logging.getLogger(__name__)

# Announcements the dialplan plays by itself when ivr-bridge is not there (see asterisk_conf/extensions.conf).
SYSTEM_PROMPTS: dict[str, list[tuple[str, str]]] = {
    "fallback": [("en", "Our automated service is not available right now. Connecting you to a person."),
                 ("zh-CN", "自助服务暂时无法使用，正在为您转接人工服务。")],
    "nobody": [("en", "Sorry, nobody can take your call right now. Please call again later. Goodbye."),
               ("zh-CN", "抱歉，现在无人接听，请稍后再拨。再见。")],
}


class PromptError(RuntimeError):
    """A prompt could not be rendered (TTS or sox failed)."""


class PromptLibrary:
    """Maps (text, language) to a sound file Asterisk can play, rendering it when missing."""

    def __init__(self, tts: TtsConfig, asterisk: AsteriskConfig) -> None:
        self.tts = tts
        self.asterisk_dir = asterisk.prompt_dir
        self.dir = asterisk.host_path(asterisk.prompt_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts")
        self._local = threading.local()
        self._ready: dict[tuple[str, str], str] = {}

    def key(self, text: str, language: str) -> str:
        voice = self.voice(language)
        digest = hashlib.sha256(f"{voice}\0{self.tts.rate}\0{language}\0{text}".encode()).hexdigest()
        return digest[:24]

    def voice(self, language: str) -> str:
        return self.tts.voices.get(language) or self.tts.voices.get(language.split("-")[0], "gmw/en-us")

    def path(self, text: str, language: str) -> str:
        """The path Asterisk plays (no extension)."""
        return f"{self.asterisk_dir}/{self.key(text, language)}"

    def exists(self, text: str, language: str) -> bool:
        return (self.dir / f"{self.key(text, language)}.wav").exists()

    # ------------------------------------------------------------------------------------------ rendering
    async def ensure(self, text: str, language: str) -> str:
        """The path to play for this prompt, rendering it first (off the event loop) if it is missing."""
        ready = self._ready.get((text, language))
        if ready is not None:  # the hot path: no hashing, no file system call
            return ready
        if not self.exists(text, language):
            await asyncio.get_running_loop().run_in_executor(self._executor, self.render, text, language)
        path = self._ready[(text, language)] = self.path(text, language)
        return path

    def render(self, text: str, language: str) -> Path:
        """Render one prompt (blocking); returns the wav path on this host."""
        key = self.key(text, language)
        target = self.dir / f"{key}.wav"
        if target.exists():
            return target
        self.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="ivr-tts-") as tmp:
            raw = Path(tmp) / "raw.wav"
            self._speak(text, language, raw)
            _to_asterisk_wav([raw], target)
        (self.dir / f"{key}.txt").write_text(text, encoding="utf-8")
        return target

    def _speak(self, text: str, language: str, out: Path) -> None:
        for attempt in range(2):
            if self._speak_pyttsx3(text, language, out, fresh=attempt > 0):
                return
            log.warning("pyttsx3 wrote no audio for %s prompt %r (attempt %d)", language, text[:40], attempt + 1)
        # pyttsx3's espeak driver now and then ends its loop before the file is written; espeak-ng itself is
        # what it drives, so the same voice and rate give the same prompt.
        out.unlink(missing_ok=True)
        result = subprocess.run(["espeak-ng", "-v", self.voice(language), "-s", str(self.tts.rate), "-w", str(out),
                                 "--", text], capture_output=True, text=True, check=False, timeout=60)
        if result.returncode != 0 or not _complete_wav(out):
            raise PromptError(f"TTS produced no audio for {language} prompt {text[:40]!r}: {result.stderr.strip()}")

    def _speak_pyttsx3(self, text: str, language: str, out: Path, fresh: bool) -> bool:
        import pyttsx3  # imported here: loading espeak is slow and only renderers need it

        engine = None if fresh else getattr(self._local, "engine", None)
        if engine is None:
            engine = pyttsx3.init("espeak")
            self._local.engine = engine
        # pyttsx3 2.99's espeak driver prints "Audio saved to ..." and, for longer texts, returns from
        # runAndWait() before its callback has written the file: keep stdout clean and wait for a whole wav.
        with contextlib.redirect_stdout(io.StringIO()):
            engine.setProperty("voice", self.voice(language))
            engine.setProperty("rate", self.tts.rate)
            engine.save_to_file(text, str(out))
            engine.runAndWait()  # one file per runAndWait: queuing two wrote only the last (PLATFORM.md)
            deadline = time.monotonic() + 10
            while not _complete_wav(out):
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        return True

    def render_system_prompts(self) -> None:
        """The dialplan's own bilingual announcements, at fixed names."""
        for name, parts in SYSTEM_PROMPTS.items():
            target = self.dir / f"{name}.wav"
            sources = [self.render(text, lang) for lang, text in parts]
            marker = self.dir / f"{name}.txt"
            summary = " / ".join(text for _, text in parts)
            if target.exists() and marker.exists() and marker.read_text(encoding="utf-8") == summary:
                continue
            _to_asterisk_wav(sources, target)
            marker.write_text(summary, encoding="utf-8")

    def build(self, flows: Iterable[Flow], progress: bool = True) -> tuple[int, int]:
        """Render every prompt the flows can play; returns (rendered now, already cached)."""
        wanted = sorted(set(flow_texts(flows)))
        todo = [item for item in wanted if not self.exists(item[1], item[0])]
        for done, (language, text) in enumerate(todo, 1):
            self.render(text, language)
            if progress:
                _progress(done, len(todo))
        self.render_system_prompts()
        return len(todo), len(wanted) - len(todo)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def flow_texts(flows: Iterable[Flow]) -> Iterable[tuple[str, str]]:
    """Every (language, text) a call through these flows may hear."""
    for flow in flows:
        for node in flow.nodes.values():
            for _key, prompt in node.prompts():
                yield from prompt.text.items()


def _complete_wav(path: Path) -> bool:
    try:
        with wave.open(str(path), "rb") as wav:
            return wav.getnframes() > 0
    except (OSError, EOFError, wave.Error):
        return False


def _to_asterisk_wav(sources: list[Path], target: Path) -> None:
    """8 kHz, mono, 16-bit wav (what Asterisk's format_wav plays without transcoding)."""
    if shutil.which("sox") is None:
        raise PromptError("sox is not installed (apt-get install sox)")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.wav")
    cmd = ["sox", *(str(s) for s in sources), "-r", "8000", "-c", "1", "-b", "16", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise PromptError(f"sox failed: {result.stderr.strip()}")
    os.chmod(tmp, 0o644)
    tmp.replace(target)


def _progress(done: int, total: int, width: int = 30) -> None:
    filled = int(width * done / max(total, 1))
    end = "\n" if done == total else ""
    sys.stderr.write(f"\r    [{'#' * filled}{'.' * (width - filled)}] {done}/{total} prompts{end}")
    sys.stderr.flush()


__all__ = ["SYSTEM_PROMPTS", "PromptError", "PromptLibrary", "flow_texts"]
