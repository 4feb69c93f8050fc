"""Model inputs carried in events: bytes + `input_encoding` + `input_shape` -> float32.

Shared by the cloud worker (offloads and audits it judges) and the trainer (hard examples
it trains on), so both sides accept exactly the same inputs. numpy, zlib and Pillow only:
no torch, so the agents never import it through here.

Encodings (the `InputEncoding` enum of OffloadRequest/HardExample):
  F32_RAW, F32_ZLIB   little-endian float32 tensor of `input_shape`, raw or zlib; returned
                      as is (finite values only).
  U8_RAW, U8_ZLIB     uint8 tensor of `input_shape`, raw or zlib; returned as pixel / 255,
                      i.e. in [0, 1] (the device's convention: `edge.policy.compress_frame`
                      sends the sensor frame in [0, 1] as 8-bit pixels).
  JPEG, PNG           an image file whose size is the shape's (H, W): shape [H, W] or
                      [1, H, W] decodes to greyscale, [3, H, W] to RGB (channels first);
                      returned as pixel / 255. A colour image for a greyscale shape is
                      converted with Pillow's ITU-R 601-2 luma ("L"), as a camera
                      pipeline would.
The pixel encodings (U8_*, JPEG, PNG) carry the *raw sample* a task preprocesses; the F32
ones carry a tensor as the sender computed it. `to_model_input` applies that rule.

Bounds (hostile or broken senders): nothing is decoded into more than
`max_decoded_bytes` (the float32 result counts), zlib is inflated with a hard cap of the
bytes the shape needs plus one (a zip bomb stops after that byte), and an image's header
size is checked against the shape and the bound before a single pixel is decoded (a
decompression bomb never allocates).
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from edgeloop.core.errors import DecodeError

ENCODINGS: Final = frozenset({"F32_RAW", "F32_ZLIB", "U8_RAW", "U8_ZLIB", "JPEG", "PNG"})
# Encodings that carry pixels of the raw sample (scaled to [0, 1]), not a model tensor.
PIXEL_ENCODINGS: Final = frozenset({"U8_RAW", "U8_ZLIB", "JPEG", "PNG"})
DEFAULT_MAX_DECODED_BYTES: Final = 1 << 20
# More dimensions than any image or sequence model input we know; guards absurd shapes.
_MAX_NDIM = 6
_F32 = np.dtype("<f4")
_U8 = np.dtype("u1")
_IMAGE_FORMATS = {"JPEG": "JPEG", "PNG": "PNG"}


class InputDecodeError(DecodeError):
    """An event's input could not be turned into a tensor.

    `reason` (the dead-letter reason and metric label) is one of:
      bad_input_encoding  the encoding is not one of `ENCODINGS` (UNKNOWN included)
      input_too_large     the shape or the body would decode past `max_decoded_bytes`,
                          or a zlib body inflates past what the shape needs (zip bomb)
      bad_input_shape     the shape is malformed, or does not match the data / image size
      bad_input_data      the bytes are not what the encoding says (bad zlib, broken
                          image, wrong byte count, NaN or infinity)
    Not retriable: the same bytes fail the same way. `detail` is the message without the
    location suffix, for callers that re-raise it under their own schema and path.
    """

    def __init__(self, message: str, *, reason: str, path: str) -> None:
        super().__init__(message, reason=reason, path=path)
        self.detail = message
        self.path: str = path


def _fail(reason: str, field: str, message: str) -> InputDecodeError:
    return InputDecodeError(message, reason=reason, path=field)


def _check_shape(shape: Sequence[int], encoding: str, max_decoded_bytes: int) -> tuple[int, ...]:
    dims = tuple(shape)
    if not 1 <= len(dims) <= _MAX_NDIM or any(
        isinstance(d, bool) or not isinstance(d, int | np.integer) or d <= 0 for d in dims
    ):
        raise _fail(
            "bad_input_shape",
            "input_shape",
            f"input_shape {list(dims)} is not 1 to {_MAX_NDIM} positive integers",
        )
    out = tuple(int(d) for d in dims)
    need = math.prod(out) * _F32.itemsize
    if need > max_decoded_bytes:
        raise _fail(
            "input_too_large",
            "input_shape",
            f"input_shape {list(out)} ({encoding}) decodes to {need} bytes of float32, "
            f"more than the limit of {max_decoded_bytes}",
        )
    return out


def _inflate(data: bytes, want: int, encoding: str, shape: tuple[int, ...]) -> bytes:
    # Bounded inflate: ask for at most want + 1 bytes, so a small body cannot expand into
    # gigabytes; the extra byte is how we know the stream holds more than the shape needs.
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, want + 1)
    except zlib.error as exc:
        raise _fail(
            "bad_input_data", "input", f"{encoding} input is not valid zlib: {exc}"
        ) from exc
    if len(out) > want or inflater.unconsumed_tail:
        raise _fail(
            "input_too_large",
            "input",
            f"{encoding} input inflates past {want} bytes; input_shape {list(shape)} "
            f"needs {want} bytes",
        )
    if not inflater.eof:
        raise _fail(
            "bad_input_data",
            "input",
            f"{encoding} input is truncated: the zlib stream ends early after {len(out)} bytes "
            f"(input_shape {list(shape)} needs {want} bytes)",
        )
    return out


def _tensor(
    data: bytes, encoding: str, shape: tuple[int, ...], dtype: np.dtype[np.generic]
) -> npt.NDArray[np.float32]:
    want = math.prod(shape) * dtype.itemsize
    body = _inflate(data, want, encoding, shape) if encoding.endswith("_ZLIB") else data
    if len(body) != want:
        kind = "float32" if dtype == _F32 else "uint8"
        raise _fail(
            "bad_input_data",
            "input",
            f"{encoding} input holds {len(body)} bytes, input_shape {list(shape)} {kind} "
            f"needs {want}",
        )
    if dtype == _U8:
        pixels = np.frombuffer(body, dtype=_U8).reshape(shape)
        return (pixels.astype(np.float32) / np.float32(255.0)).astype(np.float32)
    x = np.frombuffer(body, dtype=_F32).reshape(shape).astype(np.float32)
    if not np.isfinite(x).all():
        raise _fail("bad_input_data", "input", f"{encoding} input holds NaN or infinity")
    return x


def _image_layout(shape: tuple[int, ...], encoding: str) -> tuple[str, int, int]:
    """(Pillow mode, height, width) a shape asks for; bad_input_shape otherwise."""
    if len(shape) == 2:
        return "L", shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (1, 3):
        return ("L" if shape[0] == 1 else "RGB"), shape[1], shape[2]
    raise _fail(
        "bad_input_shape",
        "input_shape",
        f"input_shape {list(shape)} does not fit a {encoding} image: use [H, W], [1, H, W] "
        "(greyscale) or [3, H, W] (RGB)",
    )


def _image(
    data: bytes, encoding: str, shape: tuple[int, ...], max_decoded_bytes: int
) -> npt.NDArray[np.float32]:
    from PIL import Image, UnidentifiedImageError

    mode, height, width = _image_layout(shape, encoding)
    try:
        # Pillow's own bomb check (Image.MAX_IMAGE_PIXELS, ~89 Mpx) is a process-wide
        # setting that only warns below twice its value, and changing it (or the warnings
        # filter) per call would race between threads. Our bound is per call: the header
        # size is checked below, before `load()` decodes (and allocates) a single pixel.
        img = Image.open(io.BytesIO(data), formats=[_IMAGE_FORMATS[encoding]])
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise _fail(
            "bad_input_data", "input", f"input is not a readable {encoding} image: {exc}"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise _fail(
            "input_too_large", "input", f"{encoding} input declares too many pixels: {exc}"
        ) from exc
    with img:
        w, h = img.size
        bands = len(img.getbands())
        if w * h * max(bands, 1) * _F32.itemsize > max_decoded_bytes:
            raise _fail(
                "input_too_large",
                "input",
                f"{encoding} input declares {w}x{h} pixels x {bands} bands, more than the "
                f"limit of {max_decoded_bytes} decoded bytes",
            )
        if (h, w) != (height, width):
            raise _fail(
                "bad_input_shape",
                "input_shape",
                f"{encoding} input is {h}x{w} pixels (HxW) but input_shape is {list(shape)}",
            )
        try:
            img.load()
            pixels = np.asarray(img.convert(mode), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise _fail(
                "bad_input_data", "input", f"{encoding} input is truncated or corrupt: {exc}"
            ) from exc
    if mode == "RGB":
        pixels = np.transpose(pixels, (2, 0, 1))  # HWC -> CHW, the task's layout
    x = pixels.reshape(shape).astype(np.float32) / np.float32(255.0)
    return x.astype(np.float32)


def decode_input(
    data: bytes,
    encoding: str,
    shape: Sequence[int],
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> npt.NDArray[np.float32]:
    """Decode an event's `input` bytes into a float32 tensor of `shape`.

    Args:
        data: the `input` field.
        encoding: the `input_encoding` enum symbol (F32_RAW, F32_ZLIB, U8_RAW, U8_ZLIB,
            JPEG, PNG).
        shape: the `input_shape` field.
        max_decoded_bytes: upper bound on the decoded float32 tensor (and on an image's
            declared size), whatever the body claims.

    Returns:
        A float32 array of exactly `shape`: F32 values as sent, pixels scaled to [0, 1].

    Raises:
        InputDecodeError: `.reason` is bad_input_encoding, input_too_large,
            bad_input_shape or bad_input_data; the message names the field and the value.
    """
    if encoding not in ENCODINGS:
        raise _fail(
            "bad_input_encoding",
            "input_encoding",
            f"input_encoding {encoding!r} is not one of {sorted(ENCODINGS)}",
        )
    dims = _check_shape(shape, encoding, max_decoded_bytes)
    if encoding in _IMAGE_FORMATS:
        return _image(bytes(data), encoding, dims, max_decoded_bytes)
    dtype = _F32 if encoding.startswith("F32") else _U8
    return _tensor(bytes(data), encoding, dims, dtype)


Preprocess = Callable[[npt.NDArray[np.floating]], npt.NDArray[np.float32]]


def to_model_input(
    x: npt.NDArray[np.float32],
    encoding: str,
    *,
    preprocess: Preprocess,
    input_shape: Sequence[int],
) -> npt.NDArray[np.float32]:
    """The model input for a decoded tensor: pixel encodings go through the task's
    `preprocess` (they carry the raw sample), F32 ones are used as sent.

    Args:
        x: what `decode_input` returned for this `encoding`.
        encoding: the `input_encoding` symbol.
        preprocess: the task's batch preprocess, raw (N, ...) -> model input (N, C, H, W).
        input_shape: the model's input shape without the batch axis.

    Returns:
        A float32 array of exactly `input_shape`.

    Raises:
        InputDecodeError: reason bad_input_shape when the result is not `input_shape`
            (or the task's preprocess refuses the sample's shape).
    """
    want = tuple(int(d) for d in input_shape)
    out: npt.NDArray[np.float32]
    if encoding in PIXEL_ENCODINGS:
        try:
            out = np.asarray(preprocess(x[None]), dtype=np.float32)[0]
        except ValueError as exc:
            raise _fail(
                "bad_input_shape",
                "input_shape",
                f"{encoding} input of shape {list(x.shape)} is not a raw sample the task "
                f"takes: {exc}",
            ) from exc
    else:
        out = x
    if out.shape != want:
        raise _fail(
            "bad_input_shape",
            "input_shape",
            f"{encoding} input of shape {list(x.shape)} gives a model input of "
            f"{list(out.shape)}, the model takes {list(want)}",
        )
    return out
