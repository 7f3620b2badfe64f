"""Video input: the model card's frame indices, frames decoded as transformers' PyAV reader decodes them, one tile
per frame, and clear errors for missing/unreadable files or a missing PyAV."""

import builtins

import numpy as np
import pytest
from conftest import ASSETS
from PIL import Image

from mlx_internvl.config import ModelConfig, VisionConfig
from mlx_internvl.errors import UserError
from mlx_internvl.processing import frame_to_tile, normalize_tiles
from mlx_internvl.video import frame_indices, load_video_frames, video_info

CLIP = ASSETS / "video" / "carphone_pristine.mp4"  # 120 frames at 30000/1001 fps, 176x144


def test_clip_metadata():
    n, fps = video_info(CLIP)
    assert n == 120 and abs(fps - 30000 / 1001) < 1e-9


def test_indices_follow_the_model_card_formula():
    # get_index with 120 frames, 8 segments: seg = 119/8 = 14.875, k-th = int(7.4375 + round(14.875 k)),
    # rounding half to even (k=4: 59.5 -> 60).
    assert frame_indices(120, 29.97, 8) == [7, 22, 37, 52, 67, 81, 96, 111]
    # seg = 0.5: round(0.5) is 0 (half to even), so k=1 stays on frame 0 where rounding half up would give 1.
    assert frame_indices(9, 25.0, 16)[:3] == [0, 0, 1]
    # A (start, end) bound in seconds: start_idx = round(1.0 * 30) = 30, end_idx = round(2.0 * 30) = 60.
    assert frame_indices(120, 30.0, 3, bound=(1.0, 2.0)) == [35, 45, 55]
    with pytest.raises(UserError, match="num_frames: expected an integer >= 1, got 0"):
        frame_indices(120, 30.0, 0)


def test_frames_equal_transformers_pyav_reader():
    from transformers.video_utils import read_video_pyav

    idx = frame_indices(120, 30000 / 1001, 8)
    ref, meta = read_video_pyav(str(CLIP), sample_indices_fn=lambda metadata, **kw: np.array(idx))
    ours = load_video_frames(CLIP, num_frames=8)
    assert meta.total_num_frames == 120
    assert len(ours) == 8 and ours[0].size == (176, 144)
    np.testing.assert_array_equal(np.stack([np.asarray(f) for f in ours]), ref)


def test_one_tile_per_frame_is_a_plain_bicubic_resize():
    cfg = ModelConfig(vision_config=VisionConfig(), llm_config={"model_type": "qwen2"})
    frame = load_video_frames(CLIP, num_frames=1)[0]
    tile = frame_to_tile(frame, cfg)
    assert tile.shape == (1, 448, 448, 3)  # no thumbnail for a single tile
    np.testing.assert_array_equal(tile, normalize_tiles([frame.resize((448, 448), Image.BICUBIC)], 448))


def test_more_frames_than_the_video_has_repeat_frames():
    frames = load_video_frames(CLIP, num_frames=200)
    idx = frame_indices(120, 30000 / 1001, 200)
    k = next(i for i in range(199) if idx[i] == idx[i + 1])  # some frames are sampled twice
    assert len(frames) == 200 and np.array_equal(np.asarray(frames[k]), np.asarray(frames[k + 1]))


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "missing.mp4", "no such file"),
    (lambda d: (d / "noise.mp4").write_bytes(b"\x00" * 2048) and d / "noise.mp4", "not a readable video"),
    (lambda d: (d / "cut.mp4").write_bytes(CLIP.read_bytes()[:100000]) and d / "cut.mp4", "not a readable video"),
])
def test_bad_video_files(tmp_path, make, match):
    with pytest.raises(UserError, match=match):
        load_video_frames(make(tmp_path), num_frames=4)


def test_missing_pyav_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_av(name, *args, **kwargs):
        if name == "av":
            raise ImportError("No module named 'av'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_av)
    with pytest.raises(UserError, match=r"mlx-internvl\[video\]"):
        video_info(CLIP)


def test_header_frame_size_and_frames_tiled_as_they_decode():
    """`video_header` reads the frame size from the container (as transformers' PyAV reader then decodes it);
    `each` is applied to every frame as it is decoded; frames over `max_pixels` are refused from the header."""
    from transformers.video_utils import read_video_pyav

    from mlx_internvl.video import video_header

    header = video_header(CLIP)
    ref, _ = read_video_pyav(str(CLIP), sample_indices_fn=lambda metadata, **kw: np.array([0]))
    assert (header.frames, header.height, header.width) == (120, *ref.shape[1:3])
    sizes = load_video_frames(CLIP, num_frames=3, each=lambda frame: frame.size)
    assert sizes == [(header.width, header.height)] * 3
    with pytest.raises(UserError, match="176x144 pixels per frame is over the limit of 10000"):
        load_video_frames(CLIP, num_frames=3, max_pixels=10000)
