"""Music on hold for callers waiting for an agent and while an agent's phone rings.

No recording ships with the Asterisk root and nothing may be downloaded, so ivr-bridge synthesises a calm loop:
a slow pentatonic arpeggio of soft bell tones over a low pad, 8 kHz mono 16-bit (what Asterisk plays without
transcoding), starting and ending in silence so the loop has no click. Operators replace it by putting their own
8 kHz wav files in the instance's ``moh`` folder (``asterisk_conf/musiconhold.conf``).
"""

from __future__ import annotations

import array
import math
import wave
from pathlib import Path

RATE = 8000
FILE_NAME = "ivr-bridge-hold.wav"
_BEAT = 0.6                                                 # seconds a note
_NOTES = [0, 4, 7, 9, 12, 9, 7, 4, 2, 5, 9, 12, 14, 12, 9, 5]  # semitones above the root, two bars
_ROOT = 392.0                                               # G4: inside the telephone band with its overtones
_PAD = [196.0, 293.66]                                      # G3 and D4, quietly underneath


def synthesise(seconds: float = 2 * len(_NOTES) * _BEAT) -> array.array[int]:
    """The hold loop as 16-bit samples."""
    total = int(seconds * RATE)
    out = [0.0] * total
    note_len = int(_BEAT * RATE)
    for i in range(total // note_len):
        freq = _ROOT * 2 ** (_NOTES[i % len(_NOTES)] / 12)
        start = i * note_len
        for n in range(min(2 * note_len, total - start)):   # each bell rings on into the next note
            t = n / RATE
            envelope = min(1.0, t / 0.01) * math.exp(-3.0 * t)
            out[start + n] += envelope * (math.sin(2 * math.pi * freq * t) + 0.3 * math.sin(4 * math.pi * freq * t))
    fade = int(0.5 * RATE)
    for n in range(total):
        t = n / RATE
        pad = sum(math.sin(2 * math.pi * f * t) for f in _PAD) * 0.25 * (0.6 + 0.4 * math.sin(2 * math.pi * t / 4.8))
        gain = min(1.0, n / fade, (total - 1 - n) / fade)  # silent at both ends: the loop does not click
        out[n] = (out[n] * 0.45 + pad * 0.35) * gain
    peak = max(abs(v) for v in out) or 1.0
    return array.array("h", (int(v / peak * 12000) for v in out))


def install(directory: Path) -> Path:
    """Write the hold loop into ``directory`` unless it is there already; returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FILE_NAME
    if not target.exists():
        tmp = target.with_suffix(".tmp")
        with wave.open(str(tmp), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(RATE)
            wav.writeframes(synthesise().tobytes())
        tmp.replace(target)
    return target
