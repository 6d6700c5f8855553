"""Quality metrics: the analytic detector on ground-truth clips, and the fidelity numbers."""
import math

import pytest
import torch
import torch.nn.functional as F

from utils.measure.fidelity import fidelity, flicker, latent_errors, psnr, ssim
from utils.testbed.adherence import adherence, adherence_summary, detect
from utils.testbed.synthetic import ALL_COMBINATIONS, Attributes, make_dataset, render_clip

pytestmark = pytest.mark.usefixtures("one_thread")


def vae_like(video: torch.Tensor, seed: int) -> torch.Tensor:
    """A mild degradation that mimics a VAE round trip: 3 x 3 blur, Gaussian noise (sigma 0.05) and a
    small colour shift, on [3, F, H, W] in [-1, 1]."""
    frames = video.transpose(0, 1)  # [F, 3, H, W]
    blurred = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), torch.full((3, 1, 3, 3), 1 / 9), groups=3)
    noise = 0.05 * torch.randn(video.shape, generator=torch.Generator().manual_seed(seed))
    shift = torch.tensor([0.06, -0.05, 0.04])[:, None, None, None]  # ~8 of 255 per channel
    return (blurred.transpose(0, 1) + noise + shift).clamp(-1, 1)


@pytest.fixture(scope="module")
def ground_truth():
    """Every combination x 4 seeds: [300, 3, 17, 64, 64] and the attributes."""
    return make_dataset(ALL_COMBINATIONS, 4, seed=0)


# ---------------------------------------------------------------------------------------------
# prompt adherence
# ---------------------------------------------------------------------------------------------
def test_detector_reads_every_combination_of_ground_truth(ground_truth):
    videos, labels = ground_truth
    table = adherence(videos, labels)
    summary = adherence_summary(table)
    assert summary["n"] == 300 and summary["found"] == 1.0
    assert summary["all_correct"] >= 0.99, table[~table["all_correct"]]


def test_detector_survives_a_vae_like_degradation(ground_truth):
    videos, labels = ground_truth
    every_other = range(0, len(videos), 2)  # 2 seeds of each combination
    degraded = torch.stack([vae_like(videos[i], seed=i) for i in every_other])
    table = adherence(degraded, [labels[i] for i in every_other])
    assert adherence_summary(table)["all_correct"] >= 0.95, table[~table["all_correct"]]


def test_nothing_is_found_in_a_blank_clip_or_in_noise():
    generator = torch.Generator().manual_seed(0)
    blank = torch.full((3, 17, 64, 64), -0.6)
    uniform = torch.rand((3, 17, 64, 64), generator=generator) * 2 - 1
    gaussian = (0.5 * torch.randn((3, 17, 64, 64), generator=generator)).clamp(-1, 1)
    for video in (blank, uniform, gaussian):
        detection = detect(video)
        assert not detection.found and detection.shape is detection.colour is detection.motion is None
    table = adherence(torch.stack([blank, uniform]), [Attributes("circle", "red", "still")] * 2)
    assert not table[["found", "correct_shape", "correct_colour", "correct_motion", "all_correct"]].any().any()


def test_adherence_marks_each_attribute_separately():
    clip = render_clip(Attributes("circle", "red", "left"), seed=1)
    prompts = [Attributes("circle", "red", "left"), Attributes("circle", "blue", "left"),
               Attributes("square", "red", "left"), Attributes("circle", "red", "up")]
    table = adherence(clip[None].expand(4, -1, -1, -1, -1), prompts)
    assert table["caption"].tolist() == [p.caption for p in prompts]
    assert table["detected_colour"].tolist() == ["red"] * 4
    assert table["correct_colour"].tolist() == [True, False, True, True]
    assert table["correct_shape"].tolist() == [True, True, False, True]
    assert table["correct_motion"].tolist() == [True, True, True, False]
    assert table["all_correct"].tolist() == [True, False, False, False]
    assert adherence_summary(table) == dict(shape_accuracy=0.75, colour_accuracy=0.75, motion_accuracy=0.75,
                                            all_correct=0.25, found=1.0, n=4)


def test_detection_diagnostics_are_in_pixels():
    detection = detect(render_clip(Attributes("square", "white", "down"), seed=2))
    dx, dy = detection.displacement_px
    assert abs(dx) < 0.5 and 16 <= dy <= 28  # rows grow downwards
    assert detection.fill_ratio == pytest.approx(1.0, abs=0.02) and abs(detection.centroid_drop) < 0.01
    assert 14 ** 2 - 30 <= detection.area_px <= 22 ** 2 + 50
    assert detection.median_rgb == pytest.approx((235, 235, 235), abs=1)


def test_adherence_validates_its_inputs():
    videos = torch.zeros(2, 3, 5, 64, 64)
    with pytest.raises(ValueError, match="2 videos but 1 attributes"):
        adherence(videos, [Attributes("circle", "red", "left")])
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        adherence(videos[0], [Attributes("circle", "red", "left")])
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        detect(torch.zeros(4, 5, 64, 64))
    with pytest.raises(ValueError, match="empty"):
        adherence_summary(adherence(videos[:0], []))


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------
def moving_clip(batch: int = 2) -> torch.Tensor:
    """[B, 3, 5, 32, 32] smooth moving stripes in [-1, 1]: flicker is non-zero."""
    x = torch.linspace(0, 6, 32)
    frames = torch.stack([torch.sin(x[None, :] + 0.3 * t + torch.linspace(0, 3, 32)[:, None]) for t in range(5)])
    return (0.8 * frames).expand(batch, 3, -1, -1, -1).contiguous()  # [B, 3, F, H, W]


def test_identical_outputs_are_perfect():
    video, latents = moving_clip(), torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    result = fidelity(video, video.clone(), latents, latents.clone())
    assert result["psnr"] == math.inf
    assert result["ssim"] == pytest.approx(1.0, abs=1e-9)
    assert result["latent_relative_l2"] == 0.0 and result["latent_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert result["flicker_ratio"] == 1.0 and result["flicker"] > 0


def test_more_noise_gives_lower_psnr_and_ssim():
    reference = moving_clip()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(reference.shape, generator=generator)
    scores = [(psnr(reference + sigma * noise, reference), ssim(reference + sigma * noise, reference))
              for sigma in (0.01, 0.03, 0.1, 0.3)]
    psnrs, ssims = zip(*scores)
    assert all(a > b for a, b in zip(psnrs, psnrs[1:])), psnrs
    assert all(a > b for a, b in zip(ssims, ssims[1:])), ssims
    assert ssims[0] < 1.0


def test_psnr_matches_a_hand_computation_over_all_frames():
    reference = torch.zeros(3, 2, 16, 16)
    video = reference.clone()
    video[:, 0] = 0.25  # one frame off by 0.25, the other exact: mse over both frames is 0.03125
    # 1e-5 dB: torchmetrics takes log(data_range) of a float32 tensor
    assert psnr(video, reference) == pytest.approx(10 * math.log10(4 / 0.03125), abs=1e-5)
    noisy = reference + 0.1 * torch.randn(reference.shape, generator=torch.Generator().manual_seed(1))
    mse = float((noisy.double() - reference.double()).square().mean())
    assert psnr(noisy, reference) == pytest.approx(10 * math.log10(4 / mse), abs=1e-5)
    # a batch is its frames pooled: same number for [1, 3, F, H, W]
    assert psnr(noisy[None], reference[None]) == pytest.approx(psnr(noisy, reference), abs=1e-9)


def test_latent_errors_and_flicker_by_hand():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert latent_errors(2 * a, a) == {"relative_l2": 1.0, "cosine": 1.0}
    assert latent_errors(torch.tensor([0.0, 3.0, 0.0]), a)["cosine"] == 0.0
    assert math.isnan(latent_errors(0 * a, a)["cosine"]) and latent_errors(0 * a, a)["relative_l2"] == 1.0
    still = torch.zeros(3, 4, 8, 8)
    blinking = still.clone()
    blinking[:, 1::2] = 0.5  # frames 0, 0.5, 0, 0.5: every step changes by 0.5
    assert flicker(still) == 0.0 and flicker(blinking) == pytest.approx(0.5)
    static = torch.zeros(3, 4, 16, 16)
    assert fidelity(static, static)["flicker_ratio"] == 1.0
    assert fidelity(blinking.repeat(1, 1, 2, 2), static)["flicker_ratio"] == math.inf  # only the reference is static


def test_fidelity_validates_shapes():
    video = moving_clip()
    with pytest.raises(ValueError, match="same shape"):
        psnr(video, video[:1])
    with pytest.raises(ValueError, match="same shape"):
        latent_errors(torch.zeros(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="all zero"):
        latent_errors(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="both latents and reference_latents"):
        fidelity(video, video, latents=torch.ones(3))
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(torch.zeros(3, 2, 8, 8), torch.zeros(3, 2, 8, 8))
    with pytest.raises(ValueError, match="at least 2 frames"):
        flicker(torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="RGB frames"):
        psnr(torch.zeros(2, 4, 5, 8, 8), torch.zeros(2, 4, 5, 8, 8))


def test_fidelity_of_images_has_no_flicker():
    image = torch.zeros(3, 1, 16, 16)
    result = fidelity(image + 0.1, image)
    assert result["flicker"] is None and result["flicker_ratio"] is None
    assert result["psnr"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)


def test_adherence_margin_is_two_standard_errors_of_a_difference():
    from utils.testbed.adherence import adherence_margin

    assert adherence_margin(0.5, 100) == pytest.approx(2 * (2 * 0.25 / 100) ** 0.5)
    assert adherence_margin(0.45, 360) < adherence_margin(0.45, 90)  # more clips, a tighter bound
    assert adherence_margin(1.0, 50) == 0.0
    with pytest.raises(ValueError):
        adherence_margin(0.5, 0)
