"""Tiling and pixels against transformers' PIL-backend GotOcr2 image processor (the `-hf` models' preprocessor, an
implementation we did not write), the spec's worked examples from upstream, and image-opening edge cases.

transformers and upstream differ by design in two places, tested explicitly below:
- the order of equal-area candidate grids (upstream iterates a Python set; transformers lists width-major), which
  only changes the result when two equal-area grids tie exactly for best, e.g. with min_num = max_num = 4;
- transparency: upstream's `.convert('RGB')` drops alpha, transformers composites on white.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from conftest import ASSETS
from PIL import Image

from mlx_internvl.errors import UserError
from mlx_internvl.images import open_image
from mlx_internvl.processing import dynamic_preprocess, normalize_tiles, target_ratios, tile_grid

S = 448
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PHOTOS = ["image1.jpg", "image2.jpg", "image3.jpg", "chelsea.png", "astronaut.png"]


@pytest.fixture(scope="module")
def hf_processor():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    # The configuration transformers' InternVL converter writes (size 448, ImageNet statistics, bicubic).
    return GotOcr2ImageProcessorPil(size={"height": S, "width": S}, crop_to_patches=True, image_mean=MEAN,
                                    image_std=STD, resample=Image.BICUBIC)


def hf_grid(w, h, min_num, max_num):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    return get_optimal_tiled_canvas((h, w), (S, S), min_num, max_num)


def ours(image, max_num=12):
    """`[T, 3, S, S]` like the HF processor's output."""
    return normalize_tiles(dynamic_preprocess(image, 1, max_num, S, True), S).transpose(0, 3, 1, 2)


# Spec section 4.2 worked examples (upstream dynamic_preprocess, max_num 12): (W, H) -> (cols, rows), tiles incl. thumb.
WORKED = [((448, 448), (1, 1), 1), ((896, 448), (2, 1), 3), ((500, 500), (1, 1), 1), ((1000, 1000), (3, 3), 10),
          ((1920, 1080), (4, 2), 9), ((800, 600), (4, 3), 13), ((300, 1200), (1, 4), 5)]


@pytest.mark.parametrize("size,grid,n_tiles", WORKED)
def test_worked_examples_from_upstream(size, grid, n_tiles):
    assert tile_grid(*size, 1, 12, S) == grid
    assert len(dynamic_preprocess(Image.new("RGB", size), 1, 12, S, True)) == n_tiles


def test_candidate_order_is_upstreams_set_order():
    # The order upstream's set yields (spec 4.2), which differs from transformers' width-major order.
    assert target_ratios(1, 12)[:6] == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2)]


@pytest.mark.parametrize("max_num", [1, 2, 6, 12, 24, 40])
def test_grids_match_transformers_on_many_sizes(max_num):
    sizes = list(range(16, 4200, 97)) + [448, 500, 747, 896, 1000, 1080, 1200, 1920]
    mism = [(w, h) for w in sizes for h in sizes if tile_grid(w, h, 1, max_num, S) != hf_grid(w, h, 1, max_num)]
    assert not mism


@pytest.mark.parametrize("size", [(1000, 1000), (500, 500), (1344, 1344), (896, 896), (600, 600)])
def test_square_ties_follow_the_area_rule(size):
    # (1,1), (2,2), (3,3) tie exactly for a square; the larger grid wins while the image covers > half its canvas.
    w, h = size
    expect = max(g for g in [(1, 1), (2, 2), (3, 3)] if g == (1, 1) or w * h > 0.5 * S * S * g[0] * g[1])
    assert tile_grid(w, h, 1, 12, S) == expect == hf_grid(w, h, 1, 12)


@pytest.mark.parametrize("size,upstream,transformers", [
    ((1250, 500), (2, 2), (4, 1)),  # tie (4,1)/(2,2): upstream meets (2,2) last, transformers (4,1)
    ((1000, 400), (4, 1), (2, 2)),  # same tie below the area threshold: each keeps the one it met first
])
def test_equal_area_tie_differs_from_transformers_by_design(size, upstream, transformers):
    # Only grids of area 4 are allowed (min_num = max_num = 4); aspect 2.5 is equidistant from 1/1 and 4/1.
    assert target_ratios(4, 4) == [(4, 1), (1, 4), (2, 2)]
    assert tile_grid(*size, 4, 4, S) == upstream
    assert hf_grid(*size, 4, 4) == transformers


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("max_num", [12, 6, 1])
def test_pixels_equal_transformers_pil_backend(hf_processor, name, max_num):
    image = Image.open(ASSETS / "images" / name).convert("RGB")
    ref = hf_processor(images=[image], max_patches=max_num, return_tensors="np")
    got = ours(image, max_num)
    assert list(ref["num_patches"]) == [got.shape[0]]
    np.testing.assert_array_equal(got, ref["pixel_values"])


@pytest.mark.parametrize("size", [(1000, 1000), (500, 400), (1920, 1080), (300, 1200), (457, 451), (99, 2000)])
def test_pixels_equal_transformers_on_resized_photos(hf_processor, size):
    image = Image.open(ASSETS / "images" / "image1.jpg").convert("RGB").resize(size)
    ref = hf_processor(images=[image], return_tensors="np")
    np.testing.assert_array_equal(ours(image), ref["pixel_values"])


def test_thumbnail_is_last_and_only_with_several_tiles():
    image = Image.open(ASSETS / "images" / "image1.jpg").convert("RGB")
    tiles = dynamic_preprocess(image, 1, 12, S, True)
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(image.resize((S, S), Image.BICUBIC)))
    assert len(dynamic_preprocess(image.resize((S, S)), 1, 12, S, True)) == 1


# --- colour modes: what upstream's `.convert('RGB')` means, checked against the definitions --------------------

def _photo():
    return Image.open(ASSETS / "images" / "chelsea.png").convert("RGB").resize((64, 48))


def test_rgba_drops_alpha_unlike_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgb = np.asarray(_photo())
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 0, np.uint8)])  # fully transparent
    got = np.asarray(open_image(Image.fromarray(rgba, "RGBA")))
    np.testing.assert_array_equal(got, rgb)  # upstream: colour channels kept as they are
    assert (convert_to_rgb(Image.fromarray(rgba, "RGBA"), return_numpy=True) == 255).all()  # transformers: white


def test_grey_palette_cmyk_and_16bit():
    rgb = _photo()
    grey = np.asarray(rgb.convert("L"))
    np.testing.assert_array_equal(np.asarray(open_image(Image.fromarray(grey, "L"))), np.dstack([grey] * 3))
    pal = rgb.quantize(16)
    lut = np.array(pal.getpalette()[: 16 * 3], np.uint8).reshape(16, 3)
    np.testing.assert_array_equal(np.asarray(open_image(pal)), lut[np.asarray(pal)])
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 0, 0))  # full magenta ink
    assert tuple(np.asarray(open_image(cmyk))[0, 0]) == (255, 0, 255)
    deep = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    png = io.BytesIO()
    Image.fromarray(deep).save(png, format="PNG")
    got = np.asarray(open_image(png.getvalue()))
    np.testing.assert_array_equal(got[..., 0], np.minimum(deep, 255))  # Pillow clips 16-bit values, as upstream


def _jpeg_with_orientation(orientation: int) -> bytes:
    image = _photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_ignored_by_default_applied_on_request():
    data = _jpeg_with_orientation(6)  # 6: the stored picture must be turned 90 degrees clockwise for display
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    default = np.asarray(open_image(data))
    np.testing.assert_array_equal(default, stored)
    turned = np.asarray(open_image(data, exif_transpose=True))
    np.testing.assert_array_equal(turned, np.rot90(stored, k=-1))


# --- unreadable and oversized inputs --------------------------------------------------------------------------

def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data,match", [
    (_png_header_only(40000, 40000), "too large to decode safely"),  # 1.6 gigapixels, 57 bytes
    (_png_header_only(12000, 9000), "too large to decode safely"),  # between Pillow's warning and error limits
    (b"not an image at all", "not a readable image file"),
])
def test_bad_image_bytes_are_user_errors(data, match):
    with pytest.raises(UserError, match=match):
        open_image(data)


def test_truncated_and_missing_files(tmp_path):
    half = (ASSETS / "images" / "image1.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(half[: len(half) // 2])
    with pytest.raises(UserError, match="cut.jpg: cannot be decoded"):
        open_image(tmp_path / "cut.jpg")
    with pytest.raises(UserError, match="no such file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(UserError, match="over the limit"):
        open_image(Image.new("RGB", (100, 100)), max_pixels=5000)


def test_url_and_bytes_inputs_equal_the_file(tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(ASSETS / "images"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/image3.jpg"
        ref = np.asarray(open_image(ASSETS / "images" / "image3.jpg"))
        np.testing.assert_array_equal(np.asarray(open_image(url)), ref)
        np.testing.assert_array_equal(np.asarray(open_image((ASSETS / "images" / "image3.jpg").read_bytes())), ref)
        with pytest.raises(UserError, match="cannot be downloaded"):
            open_image(url.replace("image3.jpg", "nothing-here.jpg"))
    finally:
        server.shutdown()
