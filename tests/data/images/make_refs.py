"""Make the PIL reference images that tests/images.rs compares `load_rgb` against.

Run from the repository root with numpy and Pillow installed:
    python tests/data/images/make_refs.py
Writes, next to this script:
  pil_<w>x<h>.png                 seeded RGB noise (the input)
  pil_<w>x<h>__crop32.png         torchvision Resize(32) + CenterCrop(32) on PIL, i.e. PIL bilinear
                                  resize of the shorter side to 32 (longer = int(32*long/short)),
                                  then the crop at int(round((h-32)/2)), int(round((w-32)/2))
  pil_<w>x<h>__stretch32.png      PIL bilinear resize straight to 32x32
  cmyk_red.jpg                    a 16x16 CMYK JPEG (pure red in RGB)
  cam_map.npy, cam_img.png        a 16x16 float32 map in [0,1] and an RGB image
  cam_heatmap.png, cam_overlay.png  OpenCV COLORMAP_JET of the map (as RGB) and pytorch-grad-cam
                                  1.5.7 show_cam_on_image(img/255, map, use_rgb=True), inlined
The transform is spelled out (not imported from torchvision) so only PIL is needed; it is the
code path torchvision takes for PIL images. The colormap needs opencv-python-headless.
"""
import os

import cv2
import numpy as np
from PIL import Image

S = 32
SIZES = [(40, 27), (27, 40), (42, 40), (70, 19), (5, 3), (33, 33), (32, 50), (300, 4), (34, 80)]
HERE = os.path.dirname(os.path.abspath(__file__))


def resize_shorter(img, s):
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(s * long / short)
    new_w, new_h = (s, new_long) if w <= h else (new_long, s)
    return img.resize((new_w, new_h), Image.BILINEAR)


def center_crop(img, s):
    w, h = img.size
    top = int(round((h - s) / 2.0))
    left = int(round((w - s) / 2.0))
    return img.crop((left, top, left + s, top + s))


def main():
    rng = np.random.default_rng(20240611)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")
        stem = os.path.join(HERE, f"pil_{w}x{h}")
        img.save(stem + ".png")
        center_crop(resize_shorter(img, S), S).save(stem + "__crop32.png")
        img.resize((S, S), Image.BILINEAR).save(stem + "__stretch32.png")
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(os.path.join(HERE, "cmyk_red.jpg"), quality=95)
    make_cam_refs(rng)


def show_cam_on_image(img, mask, use_rgb=False, colormap=cv2.COLORMAP_JET, image_weight=0.5):
    """pytorch-grad-cam 1.5.7 pytorch_grad_cam/utils/image.py, minus its argument checks."""
    heatmap = cv2.applyColorMap(np.uint8(255 * mask), colormap)
    if use_rgb:
        heatmap = cv2.cvtColor(heatmap, cv2.COLOR_BGR2RGB)
    heatmap = np.float32(heatmap) / 255
    cam = (1 - image_weight) * heatmap + image_weight * img
    cam = cam / np.max(cam)
    return np.uint8(255 * cam)


def make_cam_refs(rng):
    cam = rng.random((16, 16), dtype=np.float32)
    cam.flat[:4] = [0.0, 1.0, 0.5, 0.25]  # the endpoints and a truncation case
    rgb = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.save(os.path.join(HERE, "cam_map.npy"), cam)
    Image.fromarray(rgb).save(os.path.join(HERE, "cam_img.png"))
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    Image.fromarray(heat).save(os.path.join(HERE, "cam_heatmap.png"))
    overlay = show_cam_on_image(np.float32(rgb) / 255, cam, use_rgb=True)
    Image.fromarray(overlay).save(os.path.join(HERE, "cam_overlay.png"))


if __name__ == "__main__":
    main()
