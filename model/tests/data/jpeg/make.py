"""Writes the small JPEGs of this directory with Pillow and prints the FNV-1a 64 hash of what
Pillow decodes them to (`Image.open(p).convert("RGB")`, HWC bytes), the constants of
GENERATED_JPEGS in model/tests/image_parity.rs. Made with Pillow 13.0.0 (libjpeg-turbo 3.2.0)
and numpy: `python3 make.py` in this directory. The layouts are those photo.jpg (baseline 4:2:0)
does not cover. 37x29 is not a multiple of any MCU size, so edge blocks and edge upsampling count.

q420_arithmetic.jpg is q420_progressive.jpg with arithmetic instead of Huffman coding, converted
losslessly by libjpeg-turbo's `jpegtran -arithmetic -outfile q420_arithmetic.jpg
q420_progressive.jpg` (Debian 12 libjpeg-turbo-progs); Pillow decodes it to the same pixels (hash).
"""
import io

import numpy as np
from PIL import Image, features

rng = np.random.default_rng(7)


def picture(w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 255 * x / max(w - 1, 1)
    b = 255 * ((x // 6 + y // 5) % 2)
    img = np.stack([r, g, b], -1) + rng.normal(0, 18, (h, w, 3))
    img[h // 3 : h // 2, w // 4 : w // 2] = [250, 10, 40]
    return np.clip(img, 0, 255).astype(np.uint8)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


rgb = Image.fromarray(picture(37, 29), "RGB")
cases = {
    "q444.jpg": dict(img=rgb, quality=90, subsampling=0),
    "q422.jpg": dict(img=rgb, quality=85, subsampling=1),
    "q420_progressive.jpg": dict(img=rgb, quality=80, subsampling=2, progressive=True),
    "q444_progressive_optimized.jpg": dict(img=rgb, quality=92, subsampling=0, progressive=True, optimize=True),
    "q411_restart.jpg": dict(img=rgb, quality=75, subsampling="4:1:1", restart_marker_blocks=2),
    "grey.jpg": dict(img=rgb.convert("L"), quality=85),
    "cmyk.jpg": dict(img=rgb.convert("CMYK"), quality=90),
}
print("libjpeg-turbo", features.version("libjpeg_turbo"))
for name, c in cases.items():
    img = c.pop("img")
    buf = io.BytesIO()
    img.save(buf, "JPEG", **c)
    with open(name, "wb") as f:
        f.write(buf.getvalue())
    out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").tobytes()
    print(f'    ("{name}", 0x{fnv1a64(out):016x}),')
