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
The transform is spelled out (not imported from torchvision) so only PIL is needed; it is the
code path torchvision takes for PIL images.
"""
import os

import numpy as np
from PIL import Image

S = 32
SIZES = [(40, 27), (27, 40), (42, 40), (70, 19), (5, 3), (33, 33), (32, 50), (300, 4)]
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


if __name__ == "__main__":
    main()
