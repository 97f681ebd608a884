"""Keep only the sm_90 (Hopper) cubins of a CUDA shared library, so that it compresses to a fraction of its size.

    python scripts/prune_fatbin.py libonnxruntime_providers_cuda.so pruned.so

For carrying onnxruntime-gpu to the lent H100/H200 machine, which takes 64 MiB per call (scripts/device_check.sh):
its wheel is 255 MB, mostly cubins for six GPU generations. Every fatbin in the library that holds an sm_90 cubin
keeps it; the payloads of its other entries are zeroed in place (headers, sizes and offsets unchanged), so the file
still loads and the CUDA loader, which picks the sm_90 entry on a Hopper GPU, never reads them. Fatbins without an
sm_90 entry are left whole. The result runs on Hopper only. Entry layout: the 16-byte fatbin header (magic
0xBA55ED50, version 1), then entries of kind (2: ELF cubin) / header size / payload size / ... / arch at byte 28.
"""

from __future__ import annotations

import struct
import sys

MAGIC = struct.pack("<I", 0xBA55ED50)
KEEP_ARCH = 90
CUBIN = 2


def prune(data: bytearray) -> tuple[int, int]:
    """Zero the non-sm_90 entries of every fatbin in ``data``; returns (bytes zeroed, fatbins left whole)."""
    zeroed = whole = 0
    pos = 0
    while (start := data.find(MAGIC, pos)) >= 0:
        _, version, header, size = struct.unpack_from("<IHHQ", data, start)
        if version != 1 or header != 16 or start + header + size > len(data):
            pos = start + 4
            continue
        entry, end, entries = start + header, start + header + size, []
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            if entry_header == 0 or entry + entry_header + payload > end:
                break  # not an entry after all: leave the rest of this fatbin as it is
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            entries.append((kind, arch, entry + entry_header, payload))
            entry += entry_header + payload
        if any(kind == CUBIN and arch == KEEP_ARCH for kind, arch, _, _ in entries):
            for kind, arch, offset, payload in entries:
                if not (kind == CUBIN and arch == KEEP_ARCH):
                    data[offset : offset + payload] = bytes(payload)
                    zeroed += payload
        else:
            whole += 1
        pos = end
    return zeroed, whole


def main() -> int:
    source, target = sys.argv[1:3]
    with open(source, "rb") as f:
        data = bytearray(f.read())
    zeroed, whole = prune(data)
    with open(target, "wb") as f:
        f.write(data)
    print(f"zeroed {zeroed / 1e6:.0f} MB of other GPUs' cubins; fatbins without sm_90 left whole: {whole}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
