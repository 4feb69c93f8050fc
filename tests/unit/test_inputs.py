"""The shared input decoder: every encoding, and every way a sender's bytes can be wrong."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgeloop.core.errors import DecodeError
from edgeloop.tasks.digits import DigitsTask, load_raw
from edgeloop.tasks.inputs import InputDecodeError, decode_input, to_model_input

SHAPE = (1, 8, 8)


def _digit() -> np.ndarray:
    return load_raw()[0][7]  # (8, 8) in [0, 1]


def _u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _image_bytes(pixels: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def _fails(reason: str, words: str, *args: object, **kw: object) -> InputDecodeError:
    with pytest.raises(InputDecodeError, match=words) as err:
        decode_input(*args, **kw)  # type: ignore[arg-type]
    assert err.value.reason == reason
    assert isinstance(err.value, DecodeError)  # dead-lettered like any other decode error
    return err.value


def test_f32_raw_and_zlib_decode_exactly() -> None:
    x = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    body = x.astype("<f4").tobytes()
    np.testing.assert_array_equal(decode_input(body, "F32_RAW", SHAPE), x)
    np.testing.assert_array_equal(decode_input(zlib.compress(body), "F32_ZLIB", list(SHAPE)), x)


def test_u8_raw_and_zlib_decode_to_the_devices_pixels_in_0_1() -> None:
    img = _digit()
    px = _u8(img)
    for got in (
        decode_input(px.tobytes(), "U8_RAW", [8, 8]),
        # Exactly what a device sends (edge.policy.compress_frame: level 6).
        decode_input(zlib.compress(px.tobytes(), 6), "U8_ZLIB", [8, 8]),
    ):
        assert got.dtype == np.float32
        assert got.shape == (8, 8)
        np.testing.assert_allclose(got, img, atol=0.5 / 255 + 1e-6)


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8)])
def test_png_is_lossless_greyscale(shape: tuple[int, ...]) -> None:
    px = _u8(_digit())
    got = decode_input(_image_bytes(px, "PNG"), "PNG", shape)
    assert got.shape == shape
    np.testing.assert_array_equal(got.reshape(8, 8), px.astype(np.float32) / 255)


def test_jpeg_decodes_close_to_the_original() -> None:
    px = _u8(_digit())
    got = decode_input(_image_bytes(px, "JPEG", quality=95), "JPEG", (1, 8, 8))
    assert got.shape == (1, 8, 8)
    assert np.abs(got[0] - px / 255).max() < 0.1  # lossy, but the same picture


def test_rgb_png_decodes_channels_first_and_greyscale_shapes_get_luma() -> None:
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    data = _image_bytes(rgb, "PNG")
    got = decode_input(data, "PNG", (3, 4, 5))
    np.testing.assert_array_equal(got[0], np.ones((4, 5), np.float32))
    np.testing.assert_array_equal(got[1:], np.zeros((2, 4, 5), np.float32))
    grey = decode_input(data, "PNG", (4, 5))
    np.testing.assert_allclose(grey, np.full((4, 5), 76 / 255, np.float32))  # ITU-R 601-2


@pytest.mark.parametrize("encoding", ["UNKNOWN", "F16_RAW", ""])
def test_unknown_encoding_is_named(encoding: str) -> None:
    err = _fails("bad_input_encoding", repr(encoding), b"\x00" * 256, encoding, SHAPE)
    assert err.path == "input_encoding"


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ([], r"input_shape \[\] is not"),
        ([1, 0, 8], r"input_shape \[1, 0, 8\]"),
        ([1, -8, 8], r"input_shape \[1, -8, 8\]"),
        ([1, 8, 8, 1, 1, 1, 1], r"input_shape \[1, 8, 8, 1, 1, 1, 1\]"),
    ],
)
def test_malformed_shapes_are_named(shape: list[int], words: str) -> None:
    _fails("bad_input_shape", words, b"", "F32_RAW", shape)


@pytest.mark.parametrize("encoding", ["F32_RAW", "U8_RAW"])
def test_wrong_byte_count_names_sizes(encoding: str) -> None:
    need = 256 if encoding == "F32_RAW" else 64
    _fails("bad_input_data", f"holds 12 bytes.*needs {need}", b"\x00" * 12, encoding, SHAPE)
    _fails("bad_input_data", f"holds {need + 1} bytes", b"\x00" * (need + 1), encoding, SHAPE)


def test_nan_and_infinity_are_refused() -> None:
    body = np.full(64, np.nan, "<f4").tobytes()
    _fails("bad_input_data", "NaN or infinity", body, "F32_RAW", SHAPE)
    body = np.full(64, np.inf, "<f4").tobytes()
    _fails("bad_input_data", "NaN or infinity", zlib.compress(body), "F32_ZLIB", SHAPE)


@pytest.mark.parametrize("encoding", ["F32_ZLIB", "U8_ZLIB"])
def test_zlib_bomb_stops_after_one_byte_too_many(encoding: str) -> None:
    # 64 MiB of zeros in ~64 KiB: the inflater is asked for the shape's bytes + 1, no more.
    bomb = zlib.compress(bytes(64 << 20), 9)
    need = 256 if encoding == "F32_ZLIB" else 64
    err = _fails("input_too_large", f"inflates past {need} bytes", bomb, encoding, SHAPE)
    assert err.path == "input"


def test_bad_and_truncated_zlib_are_bad_data() -> None:
    _fails("bad_input_data", "not valid zlib", b"not zlib at all", "U8_ZLIB", SHAPE)
    short = zlib.compress(bytes(64))[:-6]  # stream cut before its end
    _fails("bad_input_data", "truncated", short, "U8_ZLIB", SHAPE)
    _fails("bad_input_data", "holds 10 bytes", zlib.compress(bytes(10)), "U8_ZLIB", SHAPE)


def test_shape_past_the_bound_is_refused_before_decoding() -> None:
    _fails(
        "input_too_large",
        r"input_shape \[1, 1024, 1024\].*4194304 bytes",
        b"",
        "F32_RAW",
        (1, 1024, 1024),
        max_decoded_bytes=1 << 20,
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height greyscale, with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data",
    [
        _png_header_only(50_000, 50_000),  # 2.5 gigapixels declared in ~60 bytes
        _image_bytes(np.zeros((1024, 1024), np.uint8), "PNG"),  # real, just too big
    ],
    ids=["declared", "real"],
)
def test_png_decompression_bomb_refused_from_the_header(data: bytes) -> None:
    # Refused before any pixel is decoded: by our bound or, for absurd sizes, by Pillow's
    # own bomb check at open.
    _fails("input_too_large", "pixels", data, "PNG", (8, 8), max_decoded_bytes=1 << 20)


def test_jpeg_decompression_bomb_refused_from_the_header() -> None:
    data = _image_bytes(np.zeros((1024, 1024), np.uint8), "JPEG")  # ~20 KB, 4 MiB decoded
    _fails("input_too_large", "1024x1024 pixels", data, "JPEG", (8, 8), max_decoded_bytes=1 << 20)


def test_image_of_another_size_names_both() -> None:
    data = _image_bytes(np.zeros((9, 8), np.uint8), "PNG")
    err = _fails("bad_input_shape", r"9x8 pixels .* input_shape is \[1, 8, 8\]", data, "PNG", SHAPE)
    assert err.path == "input_shape"


def test_image_shape_that_is_no_image_layout() -> None:
    data = _image_bytes(np.zeros((8, 8), np.uint8), "PNG")
    _fails("bad_input_shape", r"\[2, 8, 8\] does not fit a PNG image", data, "PNG", (2, 8, 8))


@pytest.mark.parametrize("encoding", ["JPEG", "PNG"])
def test_broken_images_are_bad_data(encoding: str) -> None:
    _fails("bad_input_data", f"not a readable {encoding}", b"\x00" * 64, encoding, SHAPE)
    other = "PNG" if encoding == "JPEG" else "JPEG"
    real_other = _image_bytes(np.zeros((8, 8), np.uint8), other)
    _fails("bad_input_data", f"not a readable {encoding}", real_other, encoding, SHAPE)
    whole = _image_bytes(_u8(_digit()), encoding)
    cut = whole[: len(whole) // 2]
    # Cut in the headers (a tiny JPEG is mostly tables) or in the pixel data.
    _fails("bad_input_data", f"{encoding}.*(truncated|Truncated)", cut, encoding, SHAPE)


def test_model_input_preprocesses_pixels_and_keeps_f32() -> None:
    task = DigitsTask()
    img = _digit()
    px = decode_input(zlib.compress(_u8(img).tobytes()), "U8_ZLIB", [8, 8])
    got = to_model_input(px, "U8_ZLIB", preprocess=task.preprocess, input_shape=SHAPE)
    np.testing.assert_allclose(got, task.preprocess(img[None])[0], atol=0.5 / 255 + 1e-6)
    x = task.preprocess(img[None])[0]
    assert to_model_input(x, "F32_RAW", preprocess=task.preprocess, input_shape=SHAPE) is x
    with pytest.raises(InputDecodeError, match=r"the model takes \[1, 8, 8\]") as err:
        to_model_input(x[0], "F32_RAW", preprocess=task.preprocess, input_shape=SHAPE)
    assert err.value.reason == "bad_input_shape"
    with pytest.raises(InputDecodeError, match=r"expects \(N, 8, 8\)") as err:
        to_model_input(np.zeros((4, 4), np.float32), "PNG", preprocess=task.preprocess,
                       input_shape=SHAPE)  # fmt: skip
    assert err.value.reason == "bad_input_shape"


def test_trainer_trains_on_every_encoding_the_worker_accepts() -> None:
    """HardExamples with U8, PNG and JPEG inputs (the raw sample, as a device sends it)
    become the same model inputs as F32 ones; before, the trainer refused all but F32."""
    from edgeloop.trainer.hard_example_source import to_example_set

    task = DigitsTask()
    img = _digit()
    px = _u8(img)
    x = task.preprocess(img[None])[0]
    bodies = {
        "F32_ZLIB": (zlib.compress(x.astype("<f4").tobytes()), list(SHAPE)),
        "U8_ZLIB": (zlib.compress(px.tobytes(), 6), [8, 8]),
        "U8_RAW": (px.tobytes(), [8, 8]),
        "PNG": (_image_bytes(px, "PNG"), [8, 8]),
        "JPEG": (_image_bytes(px, "JPEG", quality=95), [8, 8]),
    }
    recs = [
        {"input": body, "input_encoding": enc, "input_shape": shape, "label": 4,
         "reasons": ["DISAGREE"], "_source": f"hard/0@{i}"}
        for i, (enc, (body, shape)) in enumerate(bodies.items())
    ]  # fmt: skip
    got = to_example_set(recs, SHAPE, 10, preprocess=task.preprocess)
    assert len(got) == 5
    assert got.label.tolist() == [4] * 5
    for i in range(5):
        np.testing.assert_allclose(got.x[i], x, atol=0.1 if i == 4 else 0.5 / 255 + 1e-6)


def test_trainer_names_the_hard_example_whose_image_is_a_bomb() -> None:
    from edgeloop.trainer.hard_example_source import TriggerRejectedError, to_example_set

    rec = {"input": _image_bytes(np.zeros((1024, 1024), np.uint8), "PNG"),
           "input_encoding": "PNG", "input_shape": [8, 8], "label": 1, "reasons": ["AUDIT"],
           "_source": "hard/0@9"}  # fmt: skip
    with pytest.raises(TriggerRejectedError, match=r"hard/0@9: PNG input declares 1024x1024"):
        to_example_set([rec], SHAPE, 10, preprocess=DigitsTask().preprocess)
