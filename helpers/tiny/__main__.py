"""python -m helpers.tiny [folder]: build the tiny profile's assets (once) and print where they are."""

import sys

from .assets import build_tiny_assets

print(build_tiny_assets(sys.argv[1] if len(sys.argv) > 1 else None))
