"""Screenshot encoding: small screens stay PNG; a busy large screen goes JPEG at the same size."""

from __future__ import annotations

import io
import os

from PIL import Image

from backends.vm.capture import MAX_IMAGE_BYTES, encode_screenshot


def test_a_plain_screen_stays_png():
    data, fmt = encode_screenshot(Image.new("RGB", (1280, 800), (30, 60, 90)), 3)
    assert fmt == "png"
    assert Image.open(io.BytesIO(data)).format == "PNG"


def test_a_busy_large_screen_is_sent_as_a_jpeg_of_the_same_size_under_the_cap():
    # a photo-like screen: smooth colour plus fine grain; its PNG is several megabytes
    grain = Image.frombytes("L", (2560, 1440), os.urandom(2560 * 1440)).point(lambda v: v // 8)
    base = Image.linear_gradient("L").resize((2560, 1440))
    busy = Image.merge("RGB", (base, Image.eval(base, lambda v: 255 - v), grain))
    assert len(encode_screenshot(busy, 3, limit=10**9)[0]) > MAX_IMAGE_BYTES
    data, fmt = encode_screenshot(busy, 3)
    assert fmt == "jpeg"
    assert len(data) <= MAX_IMAGE_BYTES
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == "JPEG"
    assert decoded.size == (2560, 1440)  # pixels stay the coordinates the tools take
