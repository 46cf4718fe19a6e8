"""Music on hold: the synthesised loop (ivr/moh.py) and the real Asterisk loading it as class ``default``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ivr import moh
from ivr.pbx import AsteriskInstance
from tests.conftest import rms, wav_seconds


@pytest.mark.unit
def test_the_hold_loop_is_an_audible_8_khz_wav_that_loops_without_a_click(tmp_path: Path) -> None:
    path = moh.install(tmp_path / "moh")
    assert wav_seconds(path) == pytest.approx(19.2, abs=0.01)
    samples = moh.synthesise()
    assert samples[0] == 0 and samples[-1] == 0, "silent at both ends"
    assert max(abs(s) for s in samples) <= 12000, "headroom: no clipping"
    assert 1500 < rms(path) < 6000
    quiet = [rms(path, t, t + 1) for t in range(1, 18)]
    assert min(quiet) > 500, f"no silent second inside the loop: {quiet}"
    before = path.stat().st_mtime_ns
    assert moh.install(tmp_path / "moh") == path and path.stat().st_mtime_ns == before, "written once"


@pytest.mark.integration
async def test_asterisk_loads_the_hold_loop_as_its_default_class(asterisk: AsteriskInstance) -> None:
    classes = await asyncio.to_thread(asterisk.rx, "moh show classes") or ""
    files = await asyncio.to_thread(asterisk.rx, "moh show files") or ""
    assert "Class: default" in classes and "Mode: files" in classes, classes
    assert f"{asterisk.config.instance_dir}/moh" in classes, classes
    assert moh.FILE_NAME.removesuffix(".wav") in files, files
