"""Build the caller's side of a bench call as one pcap for SIPp's ``play_pcap_audio``.

A real phone sends RTP all through a call (G.711, one packet every 20 ms) and interrupts it for RFC 2833/4733
DTMF. SIPp plays one pcap per call at a time (a new ``play_pcap_audio`` cancels the one playing), so the whole
timeline goes into one file: PCMU silence, the DTMF packets of the stock SIPp pcaps
(``/usr/share/sip-tester/dtmf_2833_<digit>.pcap``: 7 event packets and 3 end packets, 20 ms apart) spliced in at
the given offsets with the stream's SSRC, sequence numbers and timestamps, then PCMU again.

    .venv/bin/python bench/rtp_pcap.py out.pcap 1@2.5 2@5.14 --seconds 12
"""

from __future__ import annotations

import argparse
import struct
from dataclasses import dataclass
from pathlib import Path

STOCK_DIR = Path("/usr/share/sip-tester")
PCMU, FRAME_MS, SAMPLES = 0, 20, 160
SILENCE = b"\xff" * SAMPLES          # mu-law digital silence
SRC, DST = ("127.0.0.1", 49176), ("127.0.0.1", 10000)   # SIPp rewrites addresses and ports when it plays
DIGIT_FILES = {**{str(d): f"dtmf_2833_{d}.pcap" for d in range(10)}, "*": "dtmf_2833_star.pcap",
               "#": "dtmf_2833_pound.pcap"}


@dataclass(frozen=True)
class RtpPacket:
    offset: float        # seconds from the start of the pcap
    payload_type: int
    marker: bool
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes


def read_pcap(path: Path) -> list[tuple[float, bytes]]:
    """(time, UDP payload) of each packet of an Ethernet or Linux-cooked pcap."""
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
    link = struct.unpack(endian + "I", data[20:24])[0]
    l2 = {1: 14, 113: 16}.get(link)
    if l2 is None:
        raise ValueError(f"{path}: link type {link} not supported")
    out, offset, first = [], 24, None
    while offset + 16 <= len(data):
        sec, frac, incl, _ = struct.unpack(endian + "IIII", data[offset:offset + 16])
        offset += 16
        frame = data[offset:offset + incl]
        offset += incl
        when = sec + frac / (1e9 if nanos else 1e6)
        first = when if first is None else first
        ip = frame[l2:]
        udp = ip[(ip[0] & 0x0F) * 4:]
        out.append((when - first, udp[8:]))
    return out


def dtmf_events(digit: str) -> list[tuple[float, bool, bytes]]:
    """(offset, marker, 4-byte telephone-event payload) of the stock pcap for one digit."""
    packets = []
    for when, rtp in read_pcap(STOCK_DIR / DIGIT_FILES[digit]):
        if rtp[1] & 0x7F == PCMU:
            continue
        packets.append((when, bool(rtp[1] & 0x80), rtp[12:16]))
    if not packets:
        raise ValueError(f"no telephone-event packets in the pcap for {digit!r}")
    return packets


def caller_stream(digits: list[tuple[str, float]], seconds: float, event_pt: int = 101,
                  ssrc: int = 0x1B2C3D4E) -> list[RtpPacket]:
    """PCMU every 20 ms for ``seconds``, with each (digit, at-seconds) sent as RFC 2833 events instead of audio."""
    packets: list[RtpPacket] = []
    seq, ts, now = 1000, 16000, 0.0
    pending = sorted(digits, key=lambda d: d[1])
    frame = FRAME_MS / 1000
    while now < seconds:
        if pending and now >= pending[0][1]:
            digit, _ = pending.pop(0)
            events = dtmf_events(digit)
            start, event_ts = now, ts
            for offset, marker, payload in events:
                packets.append(RtpPacket(start + offset, event_pt, marker, seq & 0xFFFF, event_ts, ssrc, payload))
                seq += 1
            # the event took the audio's place: audio resumes on the next frame after the last event packet
            span = events[-1][0] + frame
            now = start + span
            ts += round(span * 8000)
            continue
        packets.append(RtpPacket(now, PCMU, not packets, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, SILENCE))
        seq += 1
        ts += SAMPLES
        now += frame
    return packets


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_pcap(path: Path, packets: list[RtpPacket], base_time: int = 1_700_000_000) -> None:
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    src_ip = bytes(int(x) for x in SRC[0].split("."))
    dst_ip = bytes(int(x) for x in DST[0].split("."))
    for ident, p in enumerate(packets):
        rtp = struct.pack("!BBHII", 0x80, (0x80 if p.marker else 0) | p.payload_type, p.seq, p.timestamp,
                          p.ssrc) + p.payload
        udp = struct.pack("!HHHH", SRC[1], DST[1], 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, 17, 0, src_ip, dst_ip)
        ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
        frame = b"\x00" * 12 + b"\x08\x00" + ip + udp
        micros = round(p.offset * 1e6)
        out += struct.pack("<IIII", base_time + micros // 1_000_000, micros % 1_000_000, len(frame), len(frame))
        out += frame
    path.write_bytes(bytes(out))


def build(path: Path, digits: list[tuple[str, float]], seconds: float) -> Path:
    write_pcap(path, caller_stream(digits, seconds))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("digits", nargs="+", help="DIGIT@SECONDS, e.g. 1@2.5")
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    digits = [(d.split("@")[0], float(d.split("@")[1])) for d in args.digits]
    build(args.out, digits, args.seconds)


if __name__ == "__main__":
    main()
