"""Image files as bytes, decoded per batch on the training device (data.py's tensor path for image
folders).

Loader workers only read each file's bytes (read_bytes); the process that makes the crops decodes
the batch (decode_rgb): JPEGs with torchvision.io.decode_jpeg -- batched nvJPEG with device="cuda",
libjpeg-turbo on the CPU -- as RGB, greyscale and CMYK JPEGs converted as PIL converts them (on
this project's CPU the pixels equal PIL's, tests/test_folder_tensor.py). What the decoder refuses
(a corrupt file; one over the pixel limit, read from its header before decoding; one about which
libjpeg prints "Corrupt JPEG data") comes back as None; data.py then reads that item through the
PIL path, which decodes what PIL can and applies --bad-images to the rest (the same limit, from the
header). libjpeg's messages never reach the terminal: its stderr is captured around the decode and
anything else it held is passed on. EXIF orientation is not applied, as on the PIL path
(torchvision's ImageFolder loader ignores it too).
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from typing import Optional

import torch
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # decompression-bomb limit of every decoder, from the header
_FAILED = (RuntimeError, ValueError, UserWarning)
_NOISE = b"Corrupt JPEG data"


def read_bytes(path: str) -> torch.Tensor:
    """The file's bytes as uint8 [n]; empty when it cannot be read or is empty (-> PIL path)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        raw = b""
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def is_jpeg(blob: torch.Tensor) -> bool:
    return blob.dim() == 1 and blob.numel() > 3 and blob[:3].numpy().tobytes() == JPEG_MAGIC


def _frame_header(blob: torch.Tensor) -> Optional[bytes]:
    """The bytes of a JPEG's frame header (SOFn segment, from its marker), None if not found."""
    b, p = blob[:65536].numpy().tobytes(), 2
    while p + 10 <= len(b) and b[p] == 0xFF:
        marker, length = b[p + 1], (b[p + 2] << 8) | b[p + 3]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return b[p : p + 10]
        p += 2 + length
    return None


def jpeg_components(blob: torch.Tensor) -> int:
    """Colour components in a JPEG's frame header: 1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK; 0 not found."""
    h = _frame_header(blob)
    return h[9] if h else 0


def jpeg_pixels(blob: torch.Tensor) -> int:
    """Height x width from a JPEG's frame header (0 if not found): read before decoding."""
    h = _frame_header(blob)
    return ((h[5] << 8) | h[6]) * ((h[7] << 8) | h[8]) if h else 0


class _libjpeg_messages:
    """Context: file descriptor 2 goes to a temporary file while libjpeg decodes; `.noise` says whether
    it printed "Corrupt JPEG data"; whatever else arrived there meanwhile is written on to stderr."""

    _file, _pid = None, None  # one file per process (a forked worker makes its own)

    def __enter__(self):
        if _libjpeg_messages._pid != os.getpid():
            _libjpeg_messages._file, _libjpeg_messages._pid = tempfile.TemporaryFile(), os.getpid()
        sys.stderr.flush()
        self.saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        f = self._file
        f.seek(0)
        text = f.read()
        f.seek(0)
        f.truncate()
        self.noise = _NOISE in text
        rest = b"".join(ln for ln in text.splitlines(True) if _NOISE not in ln)
        if rest:
            os.write(2, rest)


def _decode_jpegs(blobs: list, device: torch.device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings(), _libjpeg_messages() as msgs:
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: see TorchCodec
        warnings.simplefilter("error", UserWarning)  # a decoder warning (corrupt data): a failure
        if device.type == "cuda":
            out = decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        else:
            out = [decode_jpeg(b, mode=ImageReadMode.RGB) for b in blobs]
    if msgs.noise:  # libjpeg recovered from corrupt data: the file is corrupt (-> PIL path)
        raise ValueError("Corrupt JPEG data")
    return out


def decode_rgb(blobs: list, device: torch.device) -> list:
    """uint8 byte tensors -> one uint8 [3, H, W] on `device` per blob, or None where torchvision
    cannot decode it (not a JPEG, corrupt, more than MAX_PIXELS pixels in its header: never
    decoded here). One batched call for all JPEGs; if that fails, one call per JPEG, so a bad file
    costs only itself."""
    device = torch.device(device)
    out: list = [None] * len(blobs)
    jpegs = [k for k, b in enumerate(blobs) if is_jpeg(b) and 0 < jpeg_pixels(b) <= MAX_PIXELS]
    if device.type == "cuda":  # CMYK / YCCK: libjpeg's conversion (PIL's) on the CPU, then copied
        for k in [k for k in jpegs if jpeg_components(blobs[k]) == 4]:
            x = _decode_one(blobs[k], torch.device("cpu"))
            out[k] = None if x is None else x.to(device)
        jpegs = [k for k in jpegs if jpeg_components(blobs[k]) != 4]
    if not jpegs:
        return out
    try:
        for k, x in zip(jpegs, _decode_jpegs([blobs[k] for k in jpegs], device)):
            out[k] = x
    except _FAILED:
        for k in jpegs:
            out[k] = _decode_one(blobs[k], device)
    return out


def _decode_one(blob: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    try:
        return _decode_jpegs([blob], device)[0]
    except _FAILED:
        if device.type == "cuda":  # nvJPEG may refuse what libjpeg reads
            try:
                return _decode_jpegs([blob], torch.device("cpu"))[0].to(device)
            except _FAILED:
                return None
        return None
