"""The preprocessing contract and the EEG renderer (no torch, no shared data)."""

import io

import numpy as np
import pytest
from PIL import Image

from models import eeg
from models.preprocess import PreprocessContract, decode_image_bytes, to_model_input
from services.core.errors import InvalidInput, UnreadableInput

CONTRACT = PreprocessContract(input_size=32)


def picture(h=50, w=70, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :] * np.linspace(0.2, 1, h)[:, None]
    return np.clip(base + rng.normal(0, 20, (h, w)), 0, 255).astype(np.uint8)


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_shape_dtype_range_and_determinism():
    img = picture()
    out = to_model_input(img, CONTRACT)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.array_equal(out, to_model_input(img.copy(), CONTRACT))


def test_png_bytes_equal_array():
    img = picture()
    decoded = decode_image_bytes(png_bytes(img))
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    assert np.array_equal(decoded, img)
    assert np.array_equal(to_model_input(decoded, CONTRACT), to_model_input(img, CONTRACT))


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.uint16) * 257,  # 16-bit scaled
        lambda a: a.astype(np.uint16) * 16,  # 12-bit stored in 16 bits
        lambda a: a.astype(np.float64) / 255.0,  # float display values (VOI output)
        lambda a: a.astype(np.float32) * 3.5 - 1000.0,  # any linear rescale (e.g. HU-like)
        lambda a: np.repeat(a[:, :, None], 3, axis=2),  # grey stored as RGB
        lambda a: np.dstack([a, a, a, np.full_like(a, 128)]),  # RGBA
    ],
)
def test_same_picture_any_dtype_or_layout(convert):
    img = picture()
    np.testing.assert_allclose(
        to_model_input(convert(img), CONTRACT), to_model_input(img, CONTRACT), atol=1e-6
    )


def test_rgb_array_equals_rgb_png_decoded():
    rgb = np.random.default_rng(1).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    decoded = decode_image_bytes(png_bytes(rgb))
    assert np.array_equal(to_model_input(decoded, CONTRACT), to_model_input(rgb, CONTRACT))


def test_sixteen_bit_png_decodes_to_uint8():
    img = picture()
    decoded = decode_image_bytes(png_bytes(img.astype(np.uint16) * 257))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, img)


def test_constant_and_nonfinite_images():
    assert not to_model_input(np.full((10, 10), 7, np.uint8), CONTRACT).any()
    img = picture().astype(np.float64)
    img[0, 0] = np.nan
    assert np.isfinite(to_model_input(img, CONTRACT)).all()


def test_bad_inputs_raise_cbmir_errors():
    with pytest.raises(UnreadableInput):
        decode_image_bytes(b"not an image")
    with pytest.raises(InvalidInput):
        to_model_input(np.zeros((4, 4, 2)), CONTRACT)
    with pytest.raises(InvalidInput):
        PreprocessContract(input_size=32, intensity="zscore")


def test_contract_round_trip(tmp_path):
    contract = PreprocessContract(input_size=96, mean=0.5, std=0.25)
    assert PreprocessContract.from_dict(contract.to_dict()) == contract
    contract.save(tmp_path / "c.json")
    assert PreprocessContract.load(tmp_path / "c.json") == contract
    out = to_model_input(picture(), contract)
    assert out.shape == (1, 96, 96) and out.min() == pytest.approx(-2.0, abs=0.05)


def test_pad_keeps_the_aspect_ratio_and_centres_the_picture():
    wide = np.full((50, 100), 200, dtype=np.uint8)
    wide[0, 0] = 0  # the minimum, so min-max leaves the rest at 1
    padded = to_model_input(wide, PreprocessContract(input_size=64, resize="pad"))[0]
    assert padded.shape == (64, 64)
    rows = np.flatnonzero(padded.max(axis=1) > 0.5)
    assert (rows[0], rows[-1]) == (16, 47)  # 32 rows of picture, 16 of padding above and below
    assert np.all(padded[:16] == 0) and np.all(padded[48:] == 0)
    stretched = to_model_input(wide, PreprocessContract(input_size=64))[0]
    assert np.all(stretched[1:, 1:] > 0.5)  # stretch fills the square
    tall = to_model_input(wide.T.copy(), PreprocessContract(input_size=64, resize="pad"))[0]
    assert np.array_equal(tall, padded.T)  # the same rule on the other axis
    square = picture(h=60, w=60)
    assert np.array_equal(
        to_model_input(square, PreprocessContract(input_size=40, resize="pad")),
        to_model_input(square, PreprocessContract(input_size=40)),
    )
    with pytest.raises(InvalidInput):
        PreprocessContract(input_size=32, resize="crop")


# -- EEG renderer -----------------------------------------------------------------------------


def bonn_like(seed=0, n=4097):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / eeg.BONN_SAMPLING_HZ
    return 80 * np.sin(2 * np.pi * 10 * t) + 30 * np.sin(2 * np.pi * 3 * t) + rng.normal(0, 5, n)


def test_render_shape_and_fixed_scale():
    x = bonn_like()
    img = eeg.render_eeg_trace(x, eeg.BONN_SAMPLING_HZ)
    assert img.shape == (eeg.HEIGHT, eeg.WIDTH) and img.dtype == np.uint8
    assert set(np.unique(img)) <= {0, 255}
    # clipping, not autoscaling: a 4x larger signal is not the same picture
    assert not np.array_equal(img, eeg.render_eeg_trace(4 * x, eeg.BONN_SAMPLING_HZ))
    # and a DC offset is removed
    assert np.array_equal(img, eeg.render_eeg_trace(x + 500.0, eeg.BONN_SAMPLING_HZ))


def test_render_independent_of_sampling_rate():
    x = bonn_like()
    t = np.arange(4097) / eeg.BONN_SAMPLING_HZ
    rate = 512.0
    t2 = np.arange(int(t[-1] * rate) + 1) / rate
    x2 = np.interp(t2, t, x)
    a = eeg.render_eeg_trace(x, eeg.BONN_SAMPLING_HZ)
    b = eeg.render_eeg_trace(x2, rate)
    assert (a != b).mean() < 0.01


def test_render_fixed_duration():
    x = bonn_like(n=8000)
    assert np.array_equal(
        eeg.render_eeg_trace(x, eeg.BONN_SAMPLING_HZ), eeg.render_eeg_trace(x[:4097], eeg.BONN_SAMPLING_HZ)
    )
    short = eeg.render_eeg_trace(x[:1000], eeg.BONN_SAMPLING_HZ)
    assert not short[-eeg.HEIGHT // eeg.ROWS :].any()  # the last strip stays black


def test_spectrogram_render_panels_axes_and_fixed_scale():
    x = bonn_like()
    img = eeg.render_eeg(x, eeg.BONN_SAMPLING_HZ, eeg.TRACE_SPECTROGRAM)
    assert img.shape == (eeg.HEIGHT, eeg.WIDTH) and img.dtype == np.uint8
    top, spectrogram = img[: eeg.HEIGHT // 2], img[eeg.HEIGHT // 2 :]
    assert set(np.unique(top)) <= {0, 255}  # the trace panel is a binary drawing
    # 10 Hz is the strongest rhythm of bonn_like: its band is the brightest row of every frame;
    # a row is 0.68 Hz, low frequencies at the bottom, 2 px per bin
    bin_hz = eeg.RENDER_RATE_HZ / eeg.SPEC_WINDOW
    row_of_10hz = eeg.HEIGHT // 2 - 1 - 2 * round(10 / bin_hz)
    brightest = spectrogram.argmax(axis=0)
    assert np.all(np.abs(brightest - row_of_10hz) <= 2)
    # fixed dB scale, no autoscaling: half the amplitude is -6 dB, darker by 6.02/65 of 255
    quieter = eeg.render_eeg(x / 2, eeg.BONN_SAMPLING_HZ, eeg.TRACE_SPECTROGRAM)[eeg.HEIGHT // 2 :]
    step = 255 * 20 * np.log10(2) / (eeg.SPEC_DB_MAX - eeg.SPEC_DB_MIN)
    peak = spectrogram[row_of_10hz].astype(float), quieter[row_of_10hz].astype(float)
    assert np.allclose(peak[0] - peak[1], step, atol=1.5)
    # the DC offset is removed, and the picture does not depend on the sampling rate
    assert np.array_equal(img, eeg.render_eeg(x + 500.0, eeg.BONN_SAMPLING_HZ, eeg.TRACE_SPECTROGRAM))
    t = np.arange(4097) / eeg.BONN_SAMPLING_HZ
    t2 = np.arange(int(t[-1] * 512.0) + 1) / 512.0
    other_rate = eeg.render_eeg(np.interp(t2, t, x), 512.0, eeg.TRACE_SPECTROGRAM)[eeg.HEIGHT // 2 :]
    difference = np.abs(other_rate.astype(int) - spectrogram)
    assert difference[row_of_10hz].max() <= 3  # the rhythm is the same; the noise floor moves a little
    assert difference.mean() < 6


def test_render_is_named_by_the_contract():
    x = bonn_like()
    assert np.array_equal(
        eeg.render_eeg(x, eeg.BONN_SAMPLING_HZ), eeg.render_eeg_trace(x, eeg.BONN_SAMPLING_HZ)
    )
    with pytest.raises(InvalidInput):
        eeg.render_eeg(x, eeg.BONN_SAMPLING_HZ, "waterfall")
    with pytest.raises(InvalidInput):
        PreprocessContract(eeg_render="waterfall")
    # a stored contract without the field (every model before 1.2.0) draws the trace
    stored = PreprocessContract().to_dict()
    del stored["eeg_render"]
    assert PreprocessContract.from_dict(stored).eeg_render == eeg.TRACE
    spectro = PreprocessContract(eeg_render=eeg.TRACE_SPECTROGRAM)
    assert PreprocessContract.from_dict(spectro.to_dict()) == spectro


def test_read_bonn_txt(tmp_path):
    path = tmp_path / "Z001.txt"
    path.write_text("\n".join(str(v) for v in [12, -5, 33, 0]) + "\n")
    assert eeg.read_bonn_txt(path).tolist() == [12.0, -5.0, 33.0, 0.0]
    (tmp_path / "bad.txt").write_text("a b\nc\n")
    with pytest.raises(UnreadableInput):
        eeg.read_bonn_txt(tmp_path / "bad.txt")
