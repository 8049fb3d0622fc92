"""Batched augmentation on tensors: SimCLR's two views per image, and the linear probe's views.

Every random number is drawn on the CPU from the caller's `torch.Generator`, in one `torch.rand`
call whose size depends only on the batch size (never on which augmentations fire), then moved to
the device. So the same generator state gives the same views on any device, and switching an
augmentation off does not shift the random stream of the others.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sim.data.datasets import DatasetInfo

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 luma (torchvision's rgb_to_grayscale uses 0.2989)
# RGB -> YIQ (NTSC). Hue is approximated by rotating the chroma plane (I, Q) about the Y axis.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_CROP_TRIES = 10  # as torchvision's RandomResizedCrop, before it falls back to the whole image


def _unit_float(images: torch.Tensor, info: DatasetInfo, device: torch.device | str) -> torch.Tensor:
    """Check a uint8 (B, C, H, W) batch and move it to `device` as float in [0, 1]."""
    if images.dim() != 4 or images.dtype != torch.uint8 or images.shape[1] != info.channels:
        raise ValueError(f"{info.name} views need uint8 images of shape (B, {info.channels}, H, W); "
                         f"got {images.dtype} {tuple(images.shape)}")
    return images.to(device).float().div_(255)  # (B, C, H, W)


def _pixels(images: torch.Tensor, info: DatasetInfo, device: torch.device | str) -> torch.Tensor:
    """`_unit_float`, resized to S x S (bilinear) if needed."""
    x = _unit_float(images, info, device)  # (B, C, H, W)
    size = info.image_size
    if x.shape[-2:] != (size, size):  # same sampling as grid_sample over the whole image
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x  # (B, C, S, S)


def _normalise(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean, device=x.device).view(1, -1, 1, 1)  # (1, C, 1, 1)
    std = torch.tensor(info.std, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of RGB rows (n, 3, H, W) -> (n, 1, H, W); a matmul is the fastest form on CPU."""
    n, _, hgt, wid = x.shape
    luma = torch.tensor(_LUMA, device=x.device)  # (3,)
    return (luma @ x.flatten(2)).view(n, 1, hgt, wid)


def _grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """`F.affine_grid(theta, (n, C, S, S), align_corners=False)` for axis-aligned maps.

    Crops and flips have no shear or rotation, so each output column shares its input x and each
    row its input y: broadcasting two (n, S) tensors gives the same grid as affine_grid's batched
    matmul over all S*S points (tested equal) at a tenth of its cost on CPU.
    """
    n = theta.shape[0]
    base = (2 * torch.arange(size, device=theta.device, dtype=theta.dtype) + 1) / size - 1  # (S,)
    gx = theta[:, 0, 0, None] * base + theta[:, 0, 2, None]  # (n, S) input x of each column
    gy = theta[:, 1, 1, None] * base + theta[:, 1, 2, None]  # (n, S) input y of each row
    return torch.stack([gx[:, None, :].expand(n, size, size),
                        gy[:, :, None].expand(n, size, size)], dim=-1)  # (n, S, S, 2)


def _uniform(u: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * u


def _check_generator(generator: torch.Generator) -> None:
    if generator.device.type != "cpu":
        raise ValueError("views draw their parameters on the CPU: pass a CPU torch.Generator, "
                         f"not one on {generator.device}")


class SimCLRViews:
    """Two augmented views per image, batched tensor ops (no per-image Python loops over PIL).

    Each view, independently: RandomResizedCrop(S, crop_scale, crop_ratio) and a horizontal flip
    with probability flip_p, all in one grid_sample (affine_grid's grid, built directly: `_grid`);
    with probability jitter_p colour jitter in the fixed order brightness, contrast, saturation,
    hue (clamped to [0, 1] after each); grayscale with probability gray_p; Gaussian blur with
    probability blur_p (odd kernel about S/10, at least 3, sigma uniform in blur_sigma);
    normalisation with the dataset's mean and std. Defaults are SimCLR's. For 1-channel data only
    brightness and contrast apply. Images must be square (all registered datasets are).

    Deviations from torchvision, by design: crops are continuous (sub-pixel) boxes; the crop
    resize samples bilinearly without antialiasing (crops are never larger than S for the
    registered datasets, so it only upsamples); hue is a rotation in YIQ space, not an HSV shift.
    """

    def __init__(self, info: DatasetInfo, device: torch.device | str = "cpu", *,
                 crop_scale: tuple[float, float] | None = None,
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 flip_p: float = 0.5, jitter_p: float = 0.8,
                 jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
                 gray_p: float = 0.2, blur_p: float = 0.5,
                 blur_sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.info = info
        self.device = torch.device(device)
        self.crop_scale = info.crop_scale if crop_scale is None else crop_scale
        self.crop_ratio = crop_ratio
        for label, p in {"flip_p": flip_p, "jitter_p": jitter_p, "gray_p": gray_p,
                         "blur_p": blur_p}.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{label} = {p} is not a probability; use a value in [0, 1]")
        low, high = self.crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale = {self.crop_scale}: need 0 < low <= high <= 1")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio = {crop_ratio}: need 0 < low <= high")
        if jitter[3] > 0.5 or min(jitter) < 0:
            raise ValueError(f"jitter = {jitter}: strengths must be >= 0 and hue <= 0.5 turns")
        self.flip_p, self.jitter_p, self.gray_p, self.blur_p = flip_p, jitter_p, gray_p, blur_p
        self.jitter, self.blur_sigma = jitter, blur_sigma
        kernel = int(0.1 * info.image_size)
        self.blur_kernel = max(3, kernel + 1 - kernel % 2)  # odd, about S/10
        yiq = torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)
        self._yiq = yiq.float()  # (3, 3)
        self._yiq_inv = torch.linalg.inv(yiq).float()

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, C, H, W) uint8 on CPU -> (2B, C, S, S) float32 normalised views on `self.device`.

        Rows 0..B-1 are view 1 of images 0..B-1; rows B..2B-1 view 2 of the same images.
        """
        _check_generator(generator)
        n, t = 2 * images.shape[0], _CROP_TRIES
        u = torch.rand(n, 2 * t + 11, generator=generator)  # (n, 31): every draw of this batch
        u_area, u_ratio, u_pos, u_flip, u_jit, u_factor, u_gray, u_blur, u_sigma = u.split(
            [t, t, 2, 1, 1, 4, 1, 1, 1], dim=1)
        theta = self._crop_flip(u_area, u_ratio, u_pos, u_flip.squeeze(1))  # (n, 2, 3)
        b, c, s, h = self.jitter
        low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
        jittered = u_jit < self.jitter_p  # (n, 1)
        # (n, 4): brightness, contrast, saturation, hue; rows without jitter get the identity
        factors = torch.where(jittered, low + (high - low) * u_factor, identity)
        grayed = (u_gray.squeeze(1) < self.gray_p).nonzero().squeeze(1)  # (g,) rows to gray
        blurred = (u_blur.squeeze(1) < self.blur_p).nonzero().squeeze(1)  # (m,) rows to blur
        sigma = _uniform(u_sigma[blurred, 0], *self.blur_sigma)  # (m,)

        dev = self.device
        x = _unit_float(images, self.info, dev).repeat(2, 1, 1, 1)  # (2B, C, H, W) native size
        # Border padding: a box edge on the image edge samples the edge pixels, never black.
        x = F.grid_sample(x, _grid(theta.to(dev), self.info.image_size), mode="bilinear",
                          padding_mode="border", align_corners=False)  # (2B, C, S, S)
        if jittered.any():
            x = self._colour_jitter(x, factors.to(dev))
        if x.shape[1] == 3 and grayed.numel():
            rows = grayed.to(dev)
            x[rows] = _gray(x[rows]).expand(-1, 3, -1, -1)
        if blurred.numel():
            rows = blurred.to(dev)
            x[rows] = self._blur(x[rows], sigma.to(dev))
        return _normalise(x, self.info)

    def _crop_flip(self, u_area: torch.Tensor, u_ratio: torch.Tensor, u_pos: torch.Tensor,
                   u_flip: torch.Tensor) -> torch.Tensor:
        """Affine maps (n, 2, 3) from output to input coordinates, in grid_sample's [-1, 1] units.

        A candidate box of area fraction a and width/height ratio r covers w = sqrt(a r) of the
        width and h = sqrt(a / r) of the height of a square image; the first of the tries that
        fits is taken, else the whole image (torchvision's fallback for an image whose own ratio
        lies inside crop_ratio, as every registered dataset's does).
        """
        area = _uniform(u_area, *self.crop_scale)  # (n, tries)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(_uniform(u_ratio, log_lo, log_hi))
        w, h = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # (n, tries) fractions of the side
        fits = (w <= 1) & (h <= 1)
        first = fits.int().argmax(dim=1, keepdim=True)  # (n, 1): first fitting try, 0 if none
        found = fits.any(dim=1)
        w = torch.where(found, w.gather(1, first).squeeze(1), 1.0)  # (n,)
        h = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
        # Box centre uniform over the positions that keep the box inside, in [-1, 1] units.
        cx = (1 - w) * (2 * u_pos[:, 0] - 1)
        cy = (1 - h) * (2 * u_pos[:, 1] - 1)
        sign = torch.where(u_flip < self.flip_p, -1.0, 1.0)  # -1 mirrors x
        zero = torch.zeros_like(w)
        return torch.stack([torch.stack([w * sign, zero, cx], 1),
                            torch.stack([zero, h, cy], 1)], 1)  # (n, 2, 3)

    def _colour_jitter(self, x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast, saturation, hue with per-row factors (n, 4); rows at 1,1,1,0 pass.

        Works in place on `x` (grid_sample's fresh output) to save full passes over memory.
        """
        n, c = x.shape[:2]
        bright, contrast, sat, hue = (f.view(n, 1, 1, 1) for f in factors.unbind(1))
        x.mul_(bright).clamp_(0, 1)
        # Contrast blends towards the mean of the gray image, which is the luma of channel means.
        mean = x.mean(dim=(2, 3))  # (n, C)
        if c == 3:
            mean = mean @ torch.tensor(_LUMA, device=x.device)  # (n,)
        mean = mean.view(n, 1, 1, 1)
        x.mul_(contrast).add_(mean * (1 - contrast)).clamp_(0, 1)
        if c == 1:  # saturation and hue need colour
            return x
        gray = _gray(x)  # (n, 1, H, W), before x changes below
        x.mul_(sat).add_(gray.mul_(1 - sat)).clamp_(0, 1)
        angle = 2 * math.pi * hue.view(n)  # hue in turns -> radians
        cos, sin, one, zero = torch.cos(angle), torch.sin(angle), torch.ones_like(angle), 0 * angle
        rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], 1).view(n, 3, 3)
        mix = self._yiq_inv.to(x.device) @ rot @ self._yiq.to(x.device)  # (n, 3, 3) in RGB: Y kept
        return torch.bmm(mix, x.flatten(2)).view_as(x).clamp_(0, 1)  # (n, 3, S, S)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Gaussian blur with one sigma per row: separable depthwise conv, reflect padding."""
        m, c, hgt, wid = x.shape
        k = self.blur_kernel
        taps = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2  # (k,)
        kern = torch.exp(-taps**2 / (2 * sigma[:, None] ** 2))  # (m, k)
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (m C, k) one per plane
        planes = F.pad(x.reshape(1, m * c, hgt, wid), [k // 2] * 4, mode="reflect")
        planes = F.conv2d(planes, kern.view(m * c, 1, k, 1), groups=m * c)  # vertical pass
        planes = F.conv2d(planes, kern.view(m * c, 1, 1, k), groups=m * c)  # horizontal pass
        return planes.view(m, c, hgt, wid)


def probe_views(images: torch.Tensor, info: DatasetInfo, generator: torch.Generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """Linear-probe training views: resize to S, zero-pad S/8, random S crop, flip p 0.5.

    (B, C, H, W) uint8 -> (B, C, S, S) float32 normalised. Padding is black in pixel space, as
    torchvision's RandomCrop(S, padding=S // 8) on an image before Normalize.
    """
    _check_generator(generator)
    x = _pixels(images, info, device)  # (B, C, S, S)
    batch, channels, size, _ = x.shape
    pad = size // 8
    u = torch.rand(batch, 3, generator=generator)  # (B, 3): row offset, column offset, flip
    offset = (u[:, :2] * (2 * pad + 1)).long().clamp_(max=2 * pad).to(x.device)  # (B, 2)
    steps = torch.arange(size, device=x.device)
    rows = offset[:, :1] + steps  # (B, S)
    flip = (u[:, 2] < 0.5).to(x.device)[:, None]
    cols = offset[:, 1:] + torch.where(flip, size - 1 - steps, steps)  # (B, S) reversed if flipped
    padded = F.pad(x, [pad] * 4)  # (B, C, S + 2 pad, S + 2 pad)
    x = padded.gather(2, rows[:, None, :, None].expand(batch, channels, size, padded.shape[3]))
    x = x.gather(3, cols[:, None, None, :].expand(batch, channels, size, size))  # (B, C, S, S)
    return _normalise(x, info)


def plain_views(images: torch.Tensor, info: DatasetInfo,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, C, H, W) uint8 -> (B, C, S, S) float32: resized to S (bilinear) if needed, normalised."""
    return _normalise(_pixels(images, info, device), info)
